"""Tests for skip_step: a bad step leaves no trace in the optimizer."""

import functools
import re
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optaxclip as oc
from tests._helpers import JIT, maybe_jit, run_norms, run_scan, sweep

SHAPES = {"w": (6, 4), "b": (4,), "h": {"v": (3, 2)}}


def _params(seed=0):
  key = jax.random.PRNGKey(seed)
  leaves, treedef = jax.tree_util.tree_flatten(
      SHAPES, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(key, len(leaves))
  return jax.tree_util.tree_unflatten(
      treedef, [jax.random.normal(k, s) for k, s in zip(keys, leaves)])


def _batches(n, seed=1):
  """Gradient trees of varied scale, some above 1 so that clipping acts."""
  out = []
  for i in range(n):
    scale = 3.0 if i % 3 == 0 else 0.2
    out.append(jax.tree_util.tree_map(lambda x, s=scale: s * x,
                                      _params(seed + i)))
  return out


def _poison(grads, value):
  leaves, treedef = jax.tree_util.tree_flatten(grads)
  x = leaves[-1]
  leaves[-1] = x.ravel().at[5].set(value).reshape(x.shape)
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _apply(opt, params, state, grads, **extra):
  updates, state = opt.update(grads, state, params, **extra)
  return optax.apply_updates(params, updates), state


def _train(opt, params, batches, step=None):
  """A training loop: ``params`` updated by ``opt`` on each batch, one
  compiled step; returns the final params and state."""
  step = step or jax.jit(lambda p, s, g: _apply(opt, p, s, g))
  state = opt.init(params)
  for g in batches:
    params, state = step(params, state, g)
  return params, state


def _bad_batch_and_without(opt, batches, k, bad):
  """Trains ``opt`` on ``batches`` with a poisoned copy of batch ``k`` put
  in before it, and on ``batches`` alone: ``(params, state)`` of each."""
  with_bad = batches[:k] + [_poison(batches[k], bad)] + batches[k:]
  step = jax.jit(lambda p, s, g: _apply(opt, p, s, g))
  return (_train(opt, _params(), with_bad, step),
          _train(opt, _params(), batches, step))


def assert_bitwise_equal(a, b):
  """Every leaf equal bit for bit (signed zeros and NaN payloads included)."""
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes(), (x, y)


INNERS = {
    "global_norm+adamw": lambda: optax.chain(
        oc.clip_by_global_norm(1.0), optax.adamw(1e-2)),
    "zclip+adamw": lambda: optax.chain(
        oc.zclip(oc.ZScore(warmup_steps=3)), optax.adamw(1e-2)),
    "quantile+adamw": lambda: optax.chain(
        oc.clip_by_quantile(0.5, window=4), optax.adamw(1e-2)),
    "zclip+adam": lambda: optax.chain(oc.zclip(), optax.adam(1e-3)),
    "adamw": lambda: optax.adamw(1e-3),
}


# -- The guarantee ------------------------------------------------------------


@pytest.mark.parametrize("inner, bad", [
    ("global_norm+adamw", np.nan), ("global_norm+adamw", np.inf),
    ("global_norm+adamw", -np.inf), ("zclip+adamw", np.nan),
    ("quantile+adamw", np.inf)])
@pytest.mark.slow
def test_bad_batch_leaves_no_trace(inner, bad):
  # A bad batch at step k, then good batches, gives the same bits as the
  # run in which batch k never came.
  opt = oc.skip_step(INNERS[inner]())
  (p_bad, s_bad), (p_ref, s_ref) = _bad_batch_and_without(
      opt, _batches(9), 4, bad)
  assert_bitwise_equal(p_bad, p_ref)
  assert_bitwise_equal(s_bad.inner_state, s_ref.inner_state)
  assert int(s_bad.num_skipped) == 1
  assert int(s_bad.stats.count) == 10  # 9 good batches and the bad one.
  assert int(s_ref.num_skipped) == 0


def test_skipped_step_keeps_signed_zero_parameters():
  # params + update must reproduce a -0.0 parameter, so the zeros are -0.0.
  params = {"w": jnp.array([-0.0, 1.0]), "frozen": jnp.array([-0.0, 0.0])}
  opt = oc.skip_step(optax.sgd(0.1))
  state = opt.init(params)
  grads = {"w": jnp.array([jnp.nan, 1.0]), "frozen": jnp.zeros(2)}
  new, _ = jax.jit(lambda p, s, g: _apply(opt, p, s, g))(params, state, grads)
  assert_bitwise_equal(new, params)


def test_good_steps_match_the_unwrapped_optimizer():
  batches = _batches(6)
  make = INNERS["global_norm+adamw"]
  p_ref, s_ref = _train(make(), _params(), batches)
  p, s = _train(oc.skip_step(make()), _params(), batches)
  # The same arithmetic; XLA may fuse (and so round) the two programs a unit
  # in the last place apart.
  chex.assert_trees_all_close(p, p_ref, rtol=1e-6, atol=0)
  chex.assert_trees_all_close(s.inner_state, s_ref, rtol=1e-6, atol=1e-12)
  np.testing.assert_allclose(float(s.stats.norm),
                             float(oc.global_norm(batches[-1])), rtol=1e-6)
  assert float(s.stats.scale) == 1.0
  assert int(s.num_skipped) == 0 and not bool(s.skipped)


def test_matches_optax_apply_if_finite():
  # optax.apply_if_finite skips non-finite steps with lax.cond and its own
  # isfinite pass: an independent implementation of the non-finite rule.
  batches = _batches(8)
  batches[2] = _poison(batches[2], np.nan)
  batches[5] = _poison(batches[5], np.inf)
  make = INNERS["global_norm+adamw"]
  p_ref, s_ref = _train(optax.apply_if_finite(make(), 10**6), _params(),
                        batches)
  p, s = _train(oc.skip_step(make()), _params(), batches)
  chex.assert_trees_all_close(p, p_ref, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(s.inner_state, s_ref.inner_state, rtol=1e-6,
                              atol=1e-7)
  assert int(s.num_skipped) == int(s_ref.total_notfinite) == 2


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_skipped_update_is_negative_zero_in_the_leaf_dtype(dtype):
  grads = {"a": jnp.array([1.0, jnp.nan], dtype), "b": jnp.ones((2, 3), dtype),
           "none": None}
  opt = oc.skip_step(optax.adam(0.1))
  state = opt.init(grads)
  updates, state = jax.jit(opt.update)(grads, state)
  assert updates["none"] is None
  for name in ("a", "b"):
    u = np.asarray(updates[name].astype(jnp.float32))
    assert updates[name].dtype == dtype
    assert np.all(u == 0) and np.all(np.signbit(u))
  assert bool(state.skipped)


# -- The state ----------------------------------------------------------------


def test_state_holds_the_record_first_and_no_clip_counts():
  opt = oc.skip_step(optax.sgd(1.0), skip_norm=4.0, leaf_norms=True)
  grads = {"w": jnp.array([3.0, 4.0]), "b": jnp.array([0.0])}
  state = opt.init(grads)
  assert state._fields[0] == "stats" and state._fields[-1] == "inner_state"
  assert type(state).stats_name == "skip_step"
  _, state = opt.update(grads, state)
  stats = state.stats
  assert isinstance(stats, oc.ClipStats)
  assert stats.clipped is None and stats.num_clipped is None
  assert stats.frac_clipped is None
  assert int(stats.count) == 1 and float(stats.norm) == 5.0
  assert float(stats.threshold) == 4.0 and float(stats.scale) == 0.0
  chex.assert_trees_all_close(stats.leaf_norms,
                              {"w": jnp.float32(5.0), "b": jnp.float32(0.0)})
  # Without a SpikeWindow its fields are None.
  assert (state.loss, state.loss_threshold, state.history,
          state.history_count) == (None,) * 4


def test_clip_stats_finds_guard_and_inner_clipper():
  opt = oc.skip_step(optax.chain(oc.clip_by_global_norm(1.0),
                                 optax.adam(0.1)))
  params = {"w": jnp.zeros(2)}
  state = opt.init(params)
  _, state = opt.update({"w": jnp.array([3.0, 4.0])}, state, params)
  _, state = opt.update({"w": jnp.array([jnp.inf, 4.0])}, state, params)
  stats = oc.clip_stats(state)
  assert {k for k in stats if k.startswith("skip_step/")} == {
      "skip_step/count", "skip_step/norm", "skip_step/threshold",
      "skip_step/scale", "skip_step/skipped", "skip_step/num_skipped",
      "skip_step/norm_ema"}
  assert int(stats["skip_step/num_skipped"]) == 1
  assert bool(stats["skip_step/skipped"])
  assert int(stats["skip_step/count"]) == 2
  assert float(stats["skip_step/scale"]) == 0.0
  assert float(stats["clip_by_global_norm/norm"]) == 5.0  # Step 1 kept.
  assert int(stats["clip_by_global_norm/count"]) == 1
  assert float(optax.tree.get(state, "num_skipped")) == 1


# -- The rules ----------------------------------------------------------------


def test_skip_norm_rule_compiled_once_over_thresholds():
  grads = {"w": jnp.array([3.0, 4.0])}  # Norm 5.
  thresholds = [0.0, 4.0, 5.0, 6.0, np.inf]
  updates, states = sweep(
      lambda t: oc.skip_step(optax.sgd(1.0), skip_norm=t), thresholds, grads)
  np.testing.assert_array_equal(states.skipped, [True, True, False, False,
                                                 False])
  np.testing.assert_array_equal(states.stats.threshold, thresholds)
  np.testing.assert_array_equal(states.stats.scale, [0, 0, 1, 1, 1])
  np.testing.assert_array_equal(
      updates["w"], [[0, 0], [0, 0], [-3, -4], [-3, -4], [-3, -4]])


def test_skip_norm_schedule():
  grads = {"w": jnp.array([3.0, 4.0])}  # Norm 5.
  opt = oc.skip_step(optax.sgd(1.0),
                     skip_norm=optax.piecewise_constant_schedule(
                         4.0, {1: 1.5}))
  updates, states = run_scan(opt, jax.tree.map(lambda g: jnp.stack([g] * 2),
                                               grads))
  np.testing.assert_array_equal(states.skipped, [True, False])
  np.testing.assert_array_equal(states.stats.threshold, [4.0, 6.0])
  np.testing.assert_array_equal(updates["w"], [[0.0, 0.0], [-3.0, -4.0]])


def test_nonfinite_false_lets_nan_through_but_keeps_skip_norm():
  opt = oc.skip_step(optax.sgd(1.0), nonfinite=False, skip_norm=1.0)
  state = opt.init({"w": jnp.zeros(2)})
  updates, state = opt.update({"w": jnp.array([jnp.nan, 0.0])}, state)
  assert not bool(state.skipped)
  assert np.isnan(updates["w"][0])
  updates, state = opt.update({"w": jnp.array([3.0, 0.0])}, state)
  assert bool(state.skipped)
  assert int(state.num_skipped) == 1


def _spike_reference(norms, factor, decay, warmup, follow=False):
  """float64 NumPy re-implementation of the SpikeEMA rule, step by step:
  the average takes the steps taken in, and with ``follow`` every finite
  norm (its bias correction counting the steps taken)."""
  mean, taken, out = 0.0, 0, []
  for n in norms:
    limit = factor * mean if taken >= warmup else np.inf
    skip = not np.isfinite(n) or n > limit
    if np.isfinite(n) and (follow or not skip):
      # Adam-style bias correction of an EMA started at 0.
      w = (1 - decay) / (1 - decay ** (taken + 1))
      mean = mean + w * (n - mean)
    taken += not skip
    out.append((skip, limit, mean))
  return out


@functools.partial(jax.jit, static_argnames="follow")
def _spike_ema_run(norms, max_ratio, decay, warmup_steps, follow=True):
  """skip_step with a SpikeEMA of traced fields over ``norms``: one
  compilation for every rule."""
  opt = oc.skip_step(optax.sgd(1.0), rule=oc.SpikeEMA(
      max_ratio=max_ratio, decay=decay, warmup_steps=warmup_steps,
      follow=follow))
  _, states = run_scan(opt, {"g": norms[:, None]})
  return states.skipped, states.norm_ema, states.stats.threshold


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), factor=st.sampled_from([1.0, 2.0, 3.0, 5.0]),
       decay=st.sampled_from([0.0, 0.5, 0.9, 0.99]),
       warmup=st.integers(1, 6), follow=st.booleans())
def test_spike_ema_matches_reference(seed, factor, decay, warmup, follow):
  rng = np.random.default_rng(seed)
  norms = np.exp(rng.normal(0.0, 0.3, size=24))
  for i in rng.choice(24, size=4, replace=False):
    norms[i] *= rng.choice([10.0, 50.0])  # Planted spikes.
  norms[rng.integers(24)] = np.nan
  norms = norms.astype(np.float32)
  ref = _spike_reference(norms.astype(np.float64), factor, decay, warmup,
                         follow)
  skipped, ema, threshold = _spike_ema_run(
      jnp.asarray(norms), jnp.float32(factor), jnp.float32(decay),
      jnp.int32(warmup), follow=follow)
  # Compare up to the first norm too close to its bound for float32 and
  # float64 to agree.
  close = [np.isfinite(lim) and abs(n - lim) < 1e-4 * lim
           for n, (_, lim, _) in zip(norms, ref)]
  n = close.index(True) if any(close) else len(ref)
  skip_ref, limit_ref, mean_ref = (np.array(x[:n]) for x in zip(*ref))
  np.testing.assert_array_equal(np.asarray(skipped)[:n], skip_ref)
  np.testing.assert_allclose(np.asarray(ema)[:n], mean_ref, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(threshold)[:n], limit_ref, rtol=1e-5)


def test_spike_ema_skips_planted_spikes():
  norms = [20.0 if i in (5, 9) else 1.0 + 0.1 * (i % 2) for i in range(12)]
  _, states = run_norms(oc.skip_step(optax.sgd(1.0), rule=oc.SpikeEMA(
      max_ratio=4.0, warmup_steps=3)), norms)
  assert list(np.flatnonzero(np.asarray(states.skipped))) == [5, 9]


def test_spike_ema_defaults():
  assert oc.SpikeEMA() == (5.0, 0.99, 20, True)
  assert oc.SpikeEMA._fields == ("max_ratio", "decay", "warmup_steps",
                                 "follow")


@pytest.mark.slow
@pytest.mark.parametrize("follow", [True, False])
def test_spike_ema_after_a_lasting_rise(follow):
  # x10 from step 30 on: following, the average catches up and the steps
  # are taken again; not following, every step after the rise is skipped.
  norms = [1.0 + 0.05 * (i % 3) for i in range(30)] + [10.0] * 40
  _, states = run_norms(oc.skip_step(optax.sgd(1.0), rule=oc.SpikeEMA(
      warmup_steps=5, follow=follow)), norms)
  skipped = np.asarray(states.skipped)
  ref = _spike_reference(norms, 5.0, 0.99, 5, follow)
  np.testing.assert_array_equal(skipped, [s for s, _, _ in ref])
  assert skipped[30] and not skipped[:30].any()
  assert skipped[30:].all() != follow


def test_norm_ema_without_a_spike_ema_keeps_the_default_decay():
  # norm_ema is kept whatever the rule, of SpikeEMA's default decay; a
  # non-finite step stays out of it.
  norms = [1.0, 3.0, np.nan, 2.0, 0.5]
  _, states = run_norms(oc.skip_step(optax.sgd(1.0)), norms)
  ref = _spike_reference(norms, np.inf, oc.SpikeEMA().decay, 10**9)
  np.testing.assert_array_equal(states.skipped, [s for s, _, _ in ref])
  np.testing.assert_allclose(states.norm_ema, [m for _, _, m in ref],
                             rtol=1e-6)
  np.testing.assert_array_equal(states.stats.threshold, np.inf)


# -- Optax integration --------------------------------------------------------


def test_extra_args_and_params_reach_the_inner_transform():
  seen = {}

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, loss):
    seen["params"], seen["loss"] = params, loss
    return jax.tree_util.tree_map(lambda g: g * loss, updates), state

  inner = optax.chain(
      oc.clip_by_global_norm(10.0),
      optax.GradientTransformationExtraArgs(init_fn, update_fn))
  opt = oc.skip_step(inner)
  assert isinstance(opt, optax.GradientTransformationExtraArgs)
  params = {"w": jnp.ones(2)}
  with jax.disable_jit():  # Op by op, so that the values can be compared.
    updates, _ = opt.update({"w": jnp.array([1.0, 2.0])}, opt.init(params),
                            params, loss=jnp.float32(3.0))
  np.testing.assert_array_equal(updates["w"], [3.0, 6.0])
  assert seen["params"] is params and float(seen["loss"]) == 3.0


def test_inject_hyperparams():
  inner = optax.chain(oc.clip_by_global_norm(1.0), optax.sgd(1.0))
  opt = optax.inject_hyperparams(oc.skip_step)(
      inner, skip_norm=4.0, rule=oc.SpikeEMA(max_ratio=100.0,
                                              warmup_steps=2))
  grads = {"w": jnp.array([3.0, 4.0])}
  state = opt.init(grads)
  update = jax.jit(opt.update)
  _, state = update(grads, state)
  assert bool(state.inner_state.skipped)
  state.hyperparams["skip_norm"] = jnp.asarray(6.0)
  _, state = update(grads, state)
  assert not bool(state.inner_state.skipped)
  assert int(state.inner_state.num_skipped) == 1


def test_jitted_without_retrace_or_host_transfer():
  traces = []
  opt = oc.skip_step(optax.chain(oc.zclip(oc.ZScore(warmup_steps=2)),
                                 optax.adam(0.1)),
                     rule=oc.SpikeEMA(max_ratio=10.0))

  def step(p, s, g):
    traces.append(1)
    return _apply(opt, p, s, g)

  step = jax.jit(step)
  params = jax.device_put(_params())
  state = jax.device_put(opt.init(params))
  batches = [jax.device_put(g) for g in _batches(5)]
  batches[3] = jax.device_put(_poison(batches[3], np.nan))
  with jax.transfer_guard("disallow"):
    for g in batches:
      params, state = step(params, state, g)
  assert len(traces) == 1
  assert int(state.num_skipped) == 1


def _array_copies(opt, params):
  """The array copies XLA inserts in a donated step (scalars left out)."""
  def step(p, s, g):
    return _apply(opt, p, s, g)

  text = jax.jit(step, donate_argnums=(0, 1)).lower(
      params, opt.init(params), params).compile().as_text()
  return sorted(re.findall(r"= (\w+\[[\d,]+\])\S* copy\(", text))


@pytest.mark.parametrize("inner", ["adamw", "global_norm+adamw", "zclip+adam"])
def test_donated_state_is_updated_in_place(inner):
  # Selecting old or new state after the inner update would make XLA copy
  # every donated moment buffer; the guarded step copies what the bare
  # optimizer copies, nothing more.
  params = _params()
  assert (_array_copies(oc.skip_step(INNERS[inner]()), params)
          == _array_copies(INNERS[inner](), params))


def _odd_state_transform():
  """A transform whose new state swaps, repeats and hard-codes its fields."""
  class State(NamedTuple):
    a: jax.Array
    b: jax.Array
    c: jax.Array
    d: jax.Array
    e: jax.Array

  def init_fn(params):
    del params
    return State(*(jnp.full((2,), float(i)) for i in range(5)))

  def update_fn(updates, state, params=None):
    del params
    new = state.a + updates["w"]
    new_state = State(a=new, b=new, c=state.d, d=state.c,
                      e=jnp.zeros(2) + 7.0)
    return {"w": new * state.e}, new_state

  return optax.GradientTransformation(init_fn, update_fn)


@pytest.mark.parametrize(**JIT)
def test_state_fields_swapped_repeated_or_constant(jitted):
  # Each state field falls back to its own old value, whatever the inner
  # update computes it from.
  tx = _odd_state_transform()
  opt = oc.skip_step(tx)
  update = maybe_jit(opt.update, jitted)
  state = opt.init({"w": jnp.zeros(2)})
  good = {"w": jnp.array([1.0, 2.0])}
  u, state = update(good, state)
  u_ref, s_ref = tx.update(good, tx.init(None))
  assert_bitwise_equal((u, state.inner_state), (u_ref, s_ref))
  before = state.inner_state
  u, state = update({"w": jnp.array([jnp.nan, 2.0])}, state)
  assert bool(state.skipped) and float(state.stats.scale) == 0.0
  assert_bitwise_equal(state.inner_state, before)
  np.testing.assert_array_equal(u["w"], [0.0, 0.0])


def test_side_effects_of_the_inner_update_run_once():
  calls = []
  inner = optax.chain(
      optax.GradientTransformation(
          lambda p: optax.EmptyState(),
          lambda u, s, p=None: (jax.debug.callback(lambda: calls.append(1))
                                or u, s)),
      optax.adam(0.1))
  opt = oc.skip_step(inner)
  grads = {"w": jnp.ones(2)}
  jax.block_until_ready(jax.jit(opt.update)(grads, opt.init(grads)))
  assert calls == [1]


# -- Devices ------------------------------------------------------------------


def test_shard_map_axis_name_takes_the_global_decision():
  from jax.sharding import PartitionSpec as P
  n = jax.device_count()
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
  grads = jnp.ones((n, 4)).at[0, 0].set(5.0)  # Only one shard is large.
  # 5.2 lies below the global norm on any device count, and above every
  # shard's own norm but the first one's.
  opt = oc.skip_step(optax.sgd(1.0), skip_norm=5.2, axis_name="d")

  def local(g):
    state = opt.init(g)
    updates, state = opt.update(g, state)
    return updates, state.skipped[None], state.stats.norm[None]

  updates, skipped, norm = jax.jit(jax.shard_map(
      local, mesh=mesh, in_specs=P("d"), out_specs=(P("d"), P("d"), P("d"))))(
          grads)
  expected = float(oc.global_norm(grads))
  assert expected > 5.2
  np.testing.assert_allclose(np.asarray(norm), expected, rtol=1e-6)
  assert np.all(np.asarray(skipped))
  np.testing.assert_array_equal(updates, 0.0)


def test_shard_map_inner_collective():
  # The inner update is traced inside shard_map, where its psum's axis is
  # bound; the guarded result equals the bare one when the step is taken.
  from jax.sharding import PartitionSpec as P
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
  grads = jnp.arange(4.0 * jax.device_count()).reshape(-1, 4)
  inner = optax.chain(oc.clip_by_global_norm(1.0, axis_name="d"),
                      optax.sgd(1.0))

  def local(opt, g):
    return opt.update(g, opt.init(g))[0]

  def run(opt):
    return jax.jit(jax.shard_map(lambda g: local(opt, g), mesh=mesh,
                                 in_specs=P("d"), out_specs=P("d")))(grads)

  assert_bitwise_equal(run(oc.skip_step(inner, axis_name="d")), run(inner))


# -- Arguments ----------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, match", [
    ({"skip_norm": -1.0}, ValueError, "skip_norm"),
    ({"skip_norm": "big"}, TypeError, "skip_norm"),
    ({"rule": oc.SpikeEMA(max_ratio=0.5)}, ValueError,
     r"SpikeEMA: max_ratio=0.5 is outside \[1, inf\]"),
    ({"rule": oc.SpikeEMA(max_ratio=[2.0])}, TypeError, "max_ratio"),
    ({"rule": oc.SpikeEMA(max_ratio=lambda c: 2.0)}, TypeError,
     "max_ratio does not take a schedule"),
    ({"rule": oc.SpikeEMA(decay=1.0)}, ValueError, "SpikeEMA: decay"),
    ({"rule": oc.SpikeEMA(decay=-0.1)}, ValueError, "SpikeEMA: decay"),
    ({"rule": oc.SpikeEMA(decay=float("nan"))}, ValueError, "decay"),
    ({"rule": oc.SpikeEMA(warmup_steps=0)}, ValueError, "warmup_steps"),
    ({"rule": oc.SpikeEMA(warmup_steps=2.5)}, TypeError, "warmup_steps"),
    ({"rule": 128}, TypeError, r"oc\.SpikeWindow.*oc\.SpikeEMA"),
    ({"rule": (5.0, 0.99, 20)}, TypeError, "rule must be"),
    ({"nonfinite": "yes"}, TypeError, "nonfinite"),
    ({"nonfinite": False}, ValueError, "give skip_norm or rule"),
    ({"ord": 0}, ValueError, "ord"),
    ({"leaf_norms": 1}, TypeError, "leaf_norms"),
    ({"layer_axis": "0"}, TypeError, "layer_axis"),
])
def test_bad_arguments(kwargs, error, match):
  with pytest.raises(error, match=match):
    oc.skip_step(optax.sgd(1.0), **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"max_norm": 4.0}, r"max_norm= is now skip_norm="),
    ({"spike_factor": 5.0}, r"spike_factor= moved into"
     r" oc\.SpikeEMA\(max_ratio=\.\.\.\)"),
    ({"spike_decay": 0.9}, r"spike_decay= moved into oc\.SpikeEMA\(decay="),
    ({"spike_warmup": 3}, r"spike_warmup= moved into"
     r" oc\.SpikeEMA\(warmup_steps="),
    ({"spike_window": oc.SpikeWindow()}, r"spike_window= is now rule="),
])
def test_old_keywords_name_their_replacement(kwargs, match):
  with pytest.raises(TypeError, match=match):
    oc.skip_step(optax.sgd(1.0), **kwargs)


def test_removed_names():
  assert not hasattr(oc, "SkipStepStats")
  assert "SpikeEMA" in oc.__all__ and "SkipStepStats" not in oc.__all__


def test_only_inner_is_positional():
  with pytest.raises(TypeError):
    oc.skip_step(optax.sgd(1.0), True)


def test_inner_must_be_a_transformation():
  with pytest.raises(TypeError, match="inner"):
    oc.skip_step(optax.sgd)


def test_state_must_be_the_guards_own():
  opt = oc.skip_step(optax.adam(0.1))
  grads = {"w": jnp.ones(2)}
  with pytest.raises(TypeError, match="inner_state"):
    opt.update(grads, optax.adam(0.1).init(grads))


def test_updates_of_another_tree_are_refused():
  opt = oc.skip_step(optax.sgd(0.1))
  state = opt.init({"w": jnp.ones(2)})
  with pytest.raises(ValueError, match=r"leaf \['w'\] has shape \(3,\)"):
    opt.update({"w": jnp.ones(3)}, state)
  with pytest.raises(ValueError, match=r"not in init's tree: \['v'\]"):
    opt.update({"v": jnp.ones(2)}, state)


def test_lookahead_params_are_accepted():
  # optax.lookahead is initialised with LookaheadParams(fast, slow) and
  # updated with the fast parameters' gradients: skip_step guards it as it
  # is, and a bad step leaves lookahead's state (fast and slow) as it was.
  inner = optax.lookahead(optax.adam(0.1), sync_period=2, slow_step_size=0.5)
  opt = oc.skip_step(inner)
  params = optax.LookaheadParams.init_synced({"w": jnp.ones(3)})
  state, ref_state = opt.init(params), inner.init(params)
  p, ref_p = params, params
  for g in (1.0, 2.0, np.nan, 3.0):
    grads = {"w": jnp.full(3, g)}
    updates, state = opt.update(grads, state, p)
    p = optax.apply_updates(p, updates)
    if np.isfinite(g):
      ref_u, ref_state = inner.update(grads, ref_state, ref_p)
      ref_p = optax.apply_updates(ref_p, ref_u)
  assert int(state.num_skipped) == 1
  chex.assert_trees_all_close(p, ref_p)
  chex.assert_trees_all_close(state.inner_state, ref_state)
  with pytest.raises(ValueError, match=r"not in init's tree: \['v'\]"):
    opt.update({"v": jnp.ones(3)}, state, p)


# -- MultiSteps ---------------------------------------------------------------


def test_multisteps_inside_drops_the_bad_micro_batch_alone():
  # skip_step(MultiSteps(opt, 3)): a NaN micro-batch leaves the accumulator,
  # the micro-step and opt's state as they were, so the run equals, bit for
  # bit, the run in which that micro-batch never came; every later
  # accumulated step is taken.
  opt = oc.skip_step(optax.MultiSteps(INNERS["global_norm+adamw"](), 3))
  (p_bad, s_bad), (p_ref, s_ref) = _bad_batch_and_without(
      opt, _batches(12), 4, np.nan)
  assert_bitwise_equal(p_bad, p_ref)
  assert_bitwise_equal(s_bad.inner_state, s_ref.inner_state)
  assert int(s_bad.num_skipped) == 1
  assert int(s_bad.inner_state.gradient_step) == 4  # 12 good micro-batches.


def test_multisteps_outside_sees_the_accumulated_gradients():
  # MultiSteps(skip_step(opt)) is not refused (nothing in the call says
  # MultiSteps made it); as documented, the guard judges the running mean
  # once per step, and a NaN micro-batch stays in MultiSteps' accumulator:
  # every later step is skipped.
  opt = optax.MultiSteps(oc.skip_step(optax.sgd(1.0)), 2)
  params = {"w": jnp.zeros(2)}
  state = opt.init(params)
  update = jax.jit(opt.update)
  outs = []
  for g in ([1.0, 0.0], [1.0, 0.0], [jnp.nan, 0.0], [1.0, 0.0], [1.0, 0.0],
            [1.0, 0.0]):
    u, state = update({"w": jnp.array(g)}, state, params)
    outs.append(float(u["w"][0]))
  assert outs == [0.0, -1.0, 0.0, 0.0, 0.0, 0.0]
  assert int(state.inner_opt_state.num_skipped) == 2
  assert np.isnan(state.acc_grads["w"][0])


def test_multisteps_outside_with_its_own_nonfinite_rule():
  # The other legitimate nesting: MultiSteps drops non-finite micro-batches
  # itself, and skip_step judges each accumulated gradient by its norm.
  opt = optax.MultiSteps(
      oc.skip_step(optax.sgd(1.0), nonfinite=False, skip_norm=3.0), 2,
      should_skip_update_fn=optax.skip_not_finite)
  params = {"w": jnp.zeros(2)}
  state = opt.init(params)
  update = jax.jit(opt.update)
  outs = []
  for g in ([1.0, 0.0], [jnp.nan, 0.0], [1.0, 0.0], [9.0, 0.0], [9.0, 0.0]):
    u, state = update({"w": jnp.array(g)}, state, params)
    outs.append(float(u["w"][0]))
  # Window 1 (1, 1; the NaN dropped) is taken; window 2 (9, 9) is skipped.
  assert outs == [0.0, 0.0, -1.0, 0.0, 0.0]
  assert int(state.inner_opt_state.num_skipped) == 1
