"""zclip: float64 reference step by step, warm-up, jit, errors, stats."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optaxclip as oc
from tests import _references as ref
from tests._helpers import (
    JIT,
    batch_of_trees,
    maybe_jit,
    np_norm,
    run_norms,
    run_scan,
    tree_with_norm,
)

# Spikes in warm-up (8), right after it (26, 27: a burst), and later.
SPIKES = {8: 4.0, 26: 12.0, 27: 6.0, 90: 60.0, 140: 0.02, 141: 25.0}
NORMS = ref.spiky_norms(200, SPIKES, seed=11, drift=1.5)

# The reference's names are the paper's: alpha, z_thresh; zclip has no eps.
_PAPER_NAMES = dict(decay="alpha", num_std="z_thresh")


def reference(norms, rule=None, max_norm=None, eps=0.0):
  """The float64 reference run with ``rule``'s values (default: zclip's)
  under their paper names: the authors' code with ``follow=False``, or
  with the statistics fed the norm as it came."""
  kw = {_PAPER_NAMES.get(k, k): v
        for k, v in (rule or oc.ZScore())._asdict().items()}
  follow = kw.pop("follow")
  make = Following if follow else ref.ZClipReference
  run = make(max_norm=max_norm, eps=eps, **kw)
  return [run.step(g) for g in norms]


class Following(ref.ZClipReference):
  """The authors' rule, whose statistics take in a spike's norm held to
  twice the boundary's distance above the mean, ``min(g, mean + 2 *
  z_thresh * std)``, rather than its clipping value (the update is clipped
  as theirs)."""

  def step(self, g):
    mean, var = self.mean, self.var
    out = super().step(g)
    if out.spike and np.isfinite(g) and not self.skip_update_on_spike:
      # num_std as float32 holds it: a subnormal float64 one is 0 there.
      room = float(np.float32(self.z_thresh)) * max(
          math.sqrt(var), self.std_floor * mean)
      v = min(float(g), mean + 2 * room) if room > 0 else float(g)
      a = self.alpha
      self.mean = a * mean + (1 - a) * v
      self.var = a * var + (1 - a) * (v - self.mean) ** 2
      out = out._replace(mean=self.mean, var=self.var)
    return out


@pytest.mark.parametrize("rule, max_norm", [
    (oc.ZScore(), None),
    (oc.ZScore(follow=False), None),
    (oc.ZScore(mode="mean"), None),
    (oc.ZScore(mode="mean", follow=False), None),
    (oc.ZScore(mode="percentile"), None),
    (oc.ZScore(), 1.6),
    (oc.ZScore(decay=0.6, num_std=1.0, warmup_steps=5), None),
    (oc.ZScore(warmup_steps=1, num_std=1.5), None),
    (oc.ZScore(mode="mean"), 3.0),
    (oc.ZScore(std_floor=0.0), None),
], ids=["default", "published", "mean_mode", "mean_mode_published",
        "percentile_mode", "max_norm",
        "fast_ema_low_z", "one_warmup_step", "mean_mode_max_norm",
        "no_std_floor"])
@pytest.mark.slow
def test_matches_float64_reference_step_by_step(rule, max_norm):
  expected = reference(NORMS, rule, max_norm)
  out, states = run_norms(oc.zclip(rule, max_norm=max_norm), NORMS)
  np.testing.assert_allclose(states.stats.norm, NORMS, rtol=1e-5)
  np.testing.assert_allclose(
      states.stats.threshold, [s.threshold for s in expected], rtol=2e-5)
  np.testing.assert_allclose(out, [s.clipped_norm for s in expected],
                             rtol=2e-5)
  np.testing.assert_array_equal(states.spike, [s.spike for s in expected])
  np.testing.assert_array_equal(states.stats.clipped,
                                [s.clipped for s in expected])
  w = rule.warmup_steps
  np.testing.assert_allclose(states.mean[w - 1:],
                             [s.mean for s in expected][w - 1:], rtol=2e-5)
  # Variances far below the floor, (0.01 * mean) ** 2, no longer enter the
  # rule; float32 keeps them to about 1e-11.
  np.testing.assert_allclose(states.var[w - 1:],
                             [s.var for s in expected][w - 1:], rtol=1e-4,
                             atol=1e-9)
  np.testing.assert_array_equal(states.fill, np.minimum(np.arange(1, 201), w))
  assert sum(s.spike for s in expected) > 2  # Spikes happened.
  # The reference code's eps=1e-6 on the deviation changes nothing here.
  with_eps = reference(NORMS, rule, max_norm, eps=1e-6)
  assert [s.spike for s in with_eps] == [s.spike for s in expected]
  np.testing.assert_allclose(out, [s.clipped_norm for s in with_eps],
                             rtol=2e-5)


def test_planted_spikes_are_cut_back_to_trend():
  out, states = run_norms(oc.zclip(), NORMS)
  spikes = np.flatnonzero(np.asarray(states.spike))
  for i in (26, 90, 141):
    assert i in spikes
    assert out[i] < 2.0 * np.median(NORMS[:25]) * 1.5 ** (i / 200)
  assert not bool(states.stats.clipped[8])  # Warm-up: no clipping.


@pytest.mark.parametrize("follow", [True, False])
def test_adaptive_threshold_formula(follow):
  # Warm-up on [1, 1.2, 0.8, 1.0]: mean 1, var 0.02; then one spike of 5.
  tx = oc.zclip(oc.ZScore(decay=0.9, num_std=2.0, warmup_steps=4,
                          follow=follow))
  state = tx.init(jnp.zeros(1))
  for g in (1.0, 1.2, 0.8, 1.0):
    _, state = tx.update(jnp.array([g]), state)
  np.testing.assert_allclose([state.mean, state.var], [1.0, 0.02], rtol=1e-6)
  updates, state = tx.update(jnp.array([5.0]), state)
  std = np.sqrt(0.02)
  z = 4.0 / std
  expected = 1.0 + 2.0 * std / (z / 2.0)
  np.testing.assert_allclose(updates[0], expected, rtol=1e-6)
  np.testing.assert_allclose(state.z, z, rtol=1e-6)
  # Held to twice the boundary's distance, or the clipped norm.
  fed = 1.0 + 2 * 2.0 * std if follow else expected
  mean = 0.9 + 0.1 * fed
  np.testing.assert_allclose(state.mean, mean, rtol=1e-6)
  np.testing.assert_allclose(state.var, 0.9 * 0.02 + 0.1 * (fed - mean)
                             ** 2, rtol=1e-5)


@functools.cache
def _run_with_floor(mode):
  """One compiled run per mode; the deviation's floor is traced."""

  def run(floor, grads):
    rule = oc.ZScore(warmup_steps=2, std_floor=floor, mode=mode)
    updates, states = run_scan(oc.zclip(rule), grads)
    return jax.vmap(oc.global_norm)(updates), states

  return jax.jit(run)


@pytest.mark.parametrize("mode", ["adaptive", "mean", "percentile"])
@pytest.mark.parametrize("warmup, floor", [(1.0, 0.0), (0.0, 0.01)],
                         ids=["equal_norms_no_floor", "zero_norms"])
def test_zero_deviation_divides_nothing(mode, warmup, floor):
  # A warm-up of equal norms with no floor, or of zero norms, leaves a zero
  # deviation: z is 0 at or below the mean, inf above, where the norm is
  # clipped to the mean in every mode.
  norms = [warmup, warmup, warmup, 3.0]
  out, states = _run_with_floor(mode)(jnp.float32(floor),
                                      batch_of_trees(norms))
  assert np.all(np.isfinite(out))
  np.testing.assert_array_equal(states.spike, [0, 0, 0, 1])
  np.testing.assert_array_equal(states.z[:3], 0.0)  # At the mean: 0.
  assert float(states.z[3]) == np.inf
  np.testing.assert_allclose(out, [warmup] * 4, rtol=1e-6)
  np.testing.assert_allclose(states.stats.threshold[2:], [warmup] * 2,
                             rtol=1e-6)
  np.testing.assert_array_equal(states.var[:3], 0.0)
  assert float(states.var[3]) > 0  # The spike's own norm entered.


@pytest.mark.parametrize("max_norm, expected", [(None, 100.0), (2.0, 2.0)])
def test_warmup_clips_only_to_max_norm(max_norm, expected):
  tx = oc.zclip(oc.ZScore(warmup_steps=3), max_norm=max_norm)
  state = tx.init(tree_with_norm(1.0))
  for n in (1.0, 100.0):
    updates, state = tx.update(tree_with_norm(n), state)
  np.testing.assert_allclose(oc.global_norm(updates), expected, rtol=1e-6)
  assert float(state.stats.threshold) == (np.inf if max_norm is None
                                          else 2.0)
  assert not bool(state.spike) and int(state.fill) == 2


def test_nonfinite_norm_leaves_statistics_alone():
  tx = oc.zclip(oc.ZScore(warmup_steps=3))
  update = jax.jit(tx.update)
  state = tx.init(tree_with_norm(1.0))
  _, state = update(tree_with_norm(jnp.nan), state)  # In warm-up.
  assert int(state.fill) == 0
  for n in (1.0, 1.1, 0.9, 1.0):
    _, state = update(tree_with_norm(n), state)
  before = (state.mean, state.var, state.fill)
  updates, state = update(tree_with_norm(jnp.nan), state)
  assert bool(jnp.isnan(updates["a"]).all())
  chex.assert_trees_all_equal(before, (state.mean, state.var, state.fill))
  _, state = update(tree_with_norm(1.0), state)
  assert np.isfinite(float(state.mean)) and not bool(state.stats.clipped)


@functools.cache
def _scanned_run(warmup, mode):
  """One compiled run per warm-up length and mode: the decay and the number
  of deviations are traced arguments, so the rule is built inside the
  jit."""

  def run(decay, num_std, grads):
    tx = oc.zclip(oc.ZScore(decay=decay, num_std=num_std,
                            warmup_steps=warmup, mode=mode))

    def step(state, g):
      updates, state = tx.update(g, state)
      same = jnp.all(jnp.stack([jnp.all(u == x) for u, x in zip(
          jax.tree.leaves(updates), jax.tree.leaves(g))]))
      return state, (oc.global_norm(updates), state.stats.threshold,
                     state.stats.norm, same, state.spike)

    state = tx.init(jax.tree.map(lambda x: x[0], grads))
    return jax.lax.scan(step, state, grads)[1]

  return jax.jit(run)


@pytest.mark.slow
@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(1e-3, 1e3), min_size=24, max_size=24),
       st.floats(0.05, 0.99), st.floats(0.0, 4.0, allow_subnormal=False),
       st.sampled_from([1, 4]), st.sampled_from(["adaptive", "mean"]))
def test_property_clipped_below_threshold_identity_otherwise(
    norms, decay, num_std, warmup, mode):
  out, threshold, norm, same, spike = map(np.asarray, _scanned_run(
      warmup, mode)(jnp.float32(decay), jnp.float32(num_std),
                    batch_of_trees(norms)))
  assert np.all(out <= threshold * (1 + 1e-5))
  assert np.all(same[norm <= threshold])
  assert not np.any(spike[:warmup])
  expected = reference(norms, oc.ZScore(decay=decay, num_std=num_std,
                                        warmup_steps=warmup, mode=mode))
  # Compare up to the first norm within rounding of the spike boundary,
  # where float32 and float64 may decide differently.
  near = [abs(s.boundary - n) <= 1e-4 * abs(n) for n, s in zip(norms, expected)]
  stop = near.index(True) if True in near else len(norms)
  np.testing.assert_allclose(out[:stop],
                             [s.clipped_norm for s in expected][:stop],
                             rtol=1e-4)


def test_no_retrace_through_warmup_and_after():
  traces = []
  tx = oc.zclip(oc.ZScore(warmup_steps=25), max_norm=10.0)

  @jax.jit
  def update(g, state):
    traces.append(1)  # Runs only when jax traces.
    return tx.update(g, state)

  state = tx.init(tree_with_norm(1.0))
  for n in ref.spiky_norms(200, {50: 30.0, 120: 5.0}, seed=3):
    _, state = update(tree_with_norm(n), state)
  assert len(traces) == 1 and update._cache_size() == 1
  assert int(state.stats.count) == 200 and int(state.stats.num_clipped) >= 2


def test_no_host_transfer_under_jit():
  tx = oc.zclip(oc.ZScore(warmup_steps=2), max_norm=5.0)
  update = jax.jit(tx.update)
  gs = [jax.device_put(tree_with_norm(n)) for n in (1.0, 1.1, 0.9, 40.0)]
  state = jax.device_put(tx.init(gs[0]))
  jax.block_until_ready(update(gs[0], state))  # Compile outside the guard.
  with jax.transfer_guard("disallow"):
    for g in gs:
      updates, state = update(g, state)
    jax.block_until_ready((updates, state))
  assert bool(state.spike)


def test_inject_hyperparams_matches_reference():
  rule = oc.ZScore(decay=0.9, num_std=2.0, warmup_steps=10)
  tx = optax.inject_hyperparams(oc.zclip)(rule, max_norm=4.0)
  state = tx.init(tree_with_norm(1.0))
  assert set(state.hyperparams) == {"max_norm", "ord"}  # The rule is static.
  update = jax.jit(tx.update)
  norms = NORMS[:60]
  for n, e in zip(norms, reference(norms, rule, max_norm=4.0)):
    updates, state = update(tree_with_norm(n), state)
    np.testing.assert_allclose(state.inner_state.stats.threshold,
                               e.threshold, rtol=2e-5)
    np.testing.assert_allclose(np_norm(updates), e.clipped_norm, rtol=2e-5)
  assert optax.tree.get(state, "warmup_norms").shape == (10,)
  state.hyperparams["max_norm"] = jnp.asarray(0.5)
  updates, state = update(tree_with_norm(1.0), state)
  np.testing.assert_allclose(oc.global_norm(updates), 0.5, rtol=1e-6)


def test_schedules():
  # num_std falls to 0 at step 3: every norm above the mean is a spike.
  tx = oc.zclip(oc.ZScore(num_std=optax.linear_schedule(3.0, 0.0, 3),
                          warmup_steps=2, mode="mean"),
                max_norm=optax.constant_schedule(100.0))
  state = tx.init(tree_with_norm(1.0))
  for n in (1.0, 3.0, 2.5):  # Mean 2, std 1; z = 0.5 < 1 (num_std at step 2).
    updates, state = tx.update(tree_with_norm(n), state)
  assert not bool(state.spike)
  updates, state = tx.update(tree_with_norm(3.0), state)  # num_std now 0.
  assert bool(state.spike)
  np.testing.assert_allclose(oc.global_norm(updates), 0.97 * 2 + 0.03 * 2.5,
                             rtol=1e-5)


def test_stats_and_tree_get():
  opt = optax.chain(oc.zclip(oc.ZScore(warmup_steps=2)), optax.adam(1e-3))
  params = tree_with_norm(1.0)
  state = opt.init(params)
  for n in (1.0, 3.0, 2.0):
    _, state = opt.update(tree_with_norm(n), state, params)
  stats = oc.clip_stats(state)
  assert set(stats) == {f"zclip/{k}" for k in (
      "count", "norm", "threshold", "scale", "clipped", "num_clipped",
      "spike", "z", "mean", "var", "warmup_norms", "fill")}
  np.testing.assert_allclose(stats["zclip/norm"], 2.0, rtol=1e-6)
  mean = 0.97 * 2.0 + 0.03 * 2.0
  np.testing.assert_allclose(stats["zclip/mean"], mean, rtol=1e-6)
  np.testing.assert_allclose(optax.tree.get(state, "var"),
                             0.97 * 1.0 + 0.03 * (2.0 - mean) ** 2, rtol=1e-5)
  np.testing.assert_allclose(stats["zclip/threshold"], 2.0 + 2.5 * 1.0,
                             rtol=1e-6)


@pytest.mark.parametrize("rule, max_norm, match", [
    (oc.ZScore(decay=0.0), None, r"ZScore\.decay"),
    (oc.ZScore(decay=1.0), None, r"ZScore\.decay"),
    (oc.ZScore(decay=1.5), None, r"ZScore\.decay"),
    (oc.ZScore(decay=float("nan")), None, r"ZScore\.decay"),
    (oc.ZScore(num_std=-1.0), None, r"ZScore\.num_std"),
    (oc.ZScore(warmup_steps=0), None, r"ZScore\.warmup_steps"),
    (oc.ZScore(std_floor=-0.1), None, r"ZScore\.std_floor"),
    (oc.ZScore(mode="zscore"), None, r"ZScore\.mode"),
    (oc.ZScore(), -1.0, "max_norm"),
    (oc.ZScore(), float("nan"), "max_norm"),
])
def test_bad_values_raise_value_error(rule, max_norm, match):
  with pytest.raises(ValueError, match=match):
    oc.zclip(rule, max_norm=max_norm)


def test_bad_ord_raises_value_error():
  with pytest.raises(ValueError, match="ord"):
    oc.zclip(ord=0)


@pytest.mark.parametrize("args, kwargs, match", [
    ((oc.ZScore(warmup_steps=2.5),), {}, r"ZScore\.warmup_steps"),
    ((oc.ZScore(decay="x"),), {}, r"ZScore\.decay"),
    ((oc.ZScore(std_floor=optax.constant_schedule(0.1)),), {},
     r"ZScore\.std_floor"),
    ((), dict(max_norm="big"), "max_norm"),
    ((0.97,), {}, r"rule must be an oc\.ZScore"),
    (({"decay": 0.9},), {}, r"rule must be an oc\.ZScore"),
])
def test_bad_types_raise_type_error(args, kwargs, match):
  with pytest.raises(TypeError, match=match):
    oc.zclip(*args, **kwargs)


@pytest.mark.parametrize("old, match", [
    ("alpha", r"alpha=.*ZScore\(decay="),
    ("z_thresh", r"z_thresh=.*ZScore\(num_std="),
    ("warmup_steps", r"warmup_steps=.*ZScore\(warmup_steps="),
    ("mode", r"mode=.*ZScore\(mode="),
    ("std_floor", r"std_floor=.*ZScore\(std_floor="),
    ("eps", r"eps=.*removed"),
    ("skip_update_on_spike", r"skip_update_on_spike=.*oc\.skip_step"),
])
def test_old_keywords_name_their_replacement(old, match):
  with pytest.raises(TypeError, match=match):
    oc.zclip(**{old: 1})


def test_traced_warmup_steps_is_a_clear_error():
  @jax.jit
  def build(w):
    return oc.zclip(oc.ZScore(warmup_steps=w)).init(jnp.zeros(2))

  with pytest.raises(TypeError, match=r"ZScore\.warmup_steps.*Python int"):
    build(jnp.int32(4))


def test_jitted_init_under_inject_hyperparams():
  # The rule is static under inject_hyperparams: init may be jitted.
  tx = optax.inject_hyperparams(oc.zclip)(oc.ZScore(warmup_steps=4))
  state = jax.jit(tx.init)(tree_with_norm(1.0))
  assert optax.tree.get(state, "warmup_norms").shape == (4,)


@pytest.mark.parametrize(**JIT)
def test_warmup_then_clip(jitted):
  tx = oc.zclip(oc.ZScore(warmup_steps=3, num_std=1.0, mode="mean"))
  update = maybe_jit(tx.update, jitted)
  state = tx.init(jnp.zeros(2))
  for n in (1.0, 2.0, 3.0, 10.0):
    updates, state = update(jnp.array([n, 0.0]), state)
  np.testing.assert_allclose(updates, [2.0, 0.0], rtol=1e-6)
  assert bool(state.spike)
  assert int(state.stats.num_clipped) == 1


@pytest.mark.parametrize(**JIT)
def test_output_dtype_matches_input(jitted):
  g = {"h": jnp.ones(4, jnp.bfloat16), "f": jnp.ones(2, jnp.float32)}
  tx = oc.zclip(oc.ZScore(warmup_steps=1), max_norm=1.0)
  updates, state = maybe_jit(tx.update, jitted)(g, tx.init(g))
  chex.assert_trees_all_equal_dtypes(updates, g)
  assert state.mean.dtype == jnp.float32
  assert state.stats.norm.dtype == jnp.float32
  np.testing.assert_allclose(oc.global_norm(updates), 1.0, rtol=1e-2)
