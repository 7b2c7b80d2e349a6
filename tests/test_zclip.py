"""zclip: float64 reference step by step, warm-up, jit, errors, stats."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st

import optaxclip as oc
from tests import _references as ref

DIRECTION = {"a": np.linspace(-1.0, 2.0, 6).reshape(2, 3),
             "b": np.array([0.5, -0.25, 3.0])}
_UNIT = float(np.sqrt(sum(np.sum(np.square(x)) for x in DIRECTION.values())))


def tree_with_norm(norm, dtype=jnp.float32):
  """A two-leaf gradient whose global 2-norm is ``norm``."""
  return jax.tree.map(lambda d: jnp.asarray(d * (norm / _UNIT), dtype),
                      DIRECTION)


def np_norm(tree):
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                           for x in jax.tree.leaves(tree))))


def batch_of_trees(norms):
  """Leaves stacked over steps: step i has global norm ``norms[i]``."""
  n = np.asarray(norms, np.float64)
  return jax.tree.map(
      lambda d: jnp.asarray(n.reshape((-1,) + (1,) * d.ndim) * d / _UNIT,
                            jnp.float32), DIRECTION)


def run_scan(tx, norms):
  """Runs ``tx`` under jit + scan; returns post-clip norms and every state."""
  grads = batch_of_trees(norms)

  def step(state, g):
    updates, state = tx.update(g, state)
    return state, (oc.global_norm(updates), state)

  state = tx.init(tree_with_norm(1.0))
  _, (out, states) = jax.jit(lambda s, g: jax.lax.scan(step, s, g))(
      state, grads)
  return np.asarray(out, np.float64), states


# Spikes in warm-up (8), right after it (26, 27: a burst), and later.
SPIKES = {8: 4.0, 26: 12.0, 27: 6.0, 90: 60.0, 140: 0.02, 141: 25.0}
NORMS = ref.spiky_norms(200, SPIKES, seed=11, drift=1.5)


class ReferenceTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("default", {}),
      ("mean_mode", dict(mode="mean")),
      ("percentile_mode", dict(mode="percentile")),
      ("max_norm", dict(max_norm=1.6)),
      ("skip_update_on_spike", dict(skip_update_on_spike=True)),
      ("fast_ema_low_z", dict(alpha=0.6, z_thresh=1.0, warmup_steps=5)),
      ("one_warmup_step", dict(warmup_steps=1, z_thresh=1.5)),
      ("zero_eps", dict(eps=0.0, mode="mean", max_norm=3.0)),
  )
  def test_matches_float64_reference_step_by_step(self, kwargs):
    kw = dict(alpha=0.97, z_thresh=2.5, warmup_steps=25) | kwargs
    expected = ref.zclip(NORMS, **kw)
    out, states = run_scan(oc.zclip(**kw), NORMS)
    np.testing.assert_allclose(states.grad_norm, NORMS, rtol=1e-5)
    np.testing.assert_allclose(
        states.threshold, [s.threshold for s in expected], rtol=2e-5)
    np.testing.assert_allclose(out, [s.clipped_norm for s in expected],
                               rtol=2e-5)
    np.testing.assert_array_equal(states.spike, [s.spike for s in expected])
    np.testing.assert_array_equal(states.clipped,
                                  [s.clipped for s in expected])
    w = kw["warmup_steps"]
    np.testing.assert_allclose(states.mean[w - 1:],
                               [s.mean for s in expected][w - 1:], rtol=2e-5)
    # Variances far below the floor, (0.01 * mean) ** 2, no longer enter the
    # rule; float32 keeps them to about 1e-11.
    np.testing.assert_allclose(states.var[w - 1:],
                               [s.var for s in expected][w - 1:], rtol=1e-4,
                               atol=1e-9)
    np.testing.assert_array_equal(states.fill,
                                  np.minimum(np.arange(1, 201), w))
    self.assertGreater(sum(s.spike for s in expected), 2)  # Spikes happened.

  def test_planted_spikes_are_cut_back_to_trend(self):
    out, states = run_scan(oc.zclip(), NORMS)
    spikes = np.flatnonzero(np.asarray(states.spike))
    for i in (26, 90, 141):
      self.assertIn(i, spikes)
      self.assertLess(out[i], 2.0 * np.median(NORMS[:25]) * 1.5 ** (i / 200))
    self.assertFalse(bool(states.clipped[8]))  # Warm-up: no clipping.


def test_adaptive_threshold_formula():
  # Warm-up on [1, 1.2, 0.8, 1.0]: mean 1, var 0.02; then one spike of 5.
  tx = oc.zclip(alpha=0.9, z_thresh=2.0, warmup_steps=4, eps=0.0)
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
  mean = 0.9 + 0.1 * expected  # EMA fed the clipped norm.
  np.testing.assert_allclose(state.mean, mean, rtol=1e-6)
  np.testing.assert_allclose(state.var, 0.9 * 0.02 + 0.1 * (expected - mean)
                             ** 2, rtol=1e-5)


def test_warmup_clips_only_to_max_norm():
  for max_norm, expected in ((None, 100.0), (2.0, 2.0)):
    tx = oc.zclip(warmup_steps=3, max_norm=max_norm)
    state = tx.init(tree_with_norm(1.0))
    for n in (1.0, 100.0):
      updates, state = tx.update(tree_with_norm(n), state)
    np.testing.assert_allclose(oc.global_norm(updates), expected, rtol=1e-6)
    assert float(state.threshold) == (np.inf if max_norm is None else 2.0)
    assert not bool(state.spike) and int(state.fill) == 2


def test_nonfinite_norm_leaves_statistics_alone():
  tx = oc.zclip(warmup_steps=3)
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
  assert np.isfinite(float(state.mean)) and not bool(state.clipped)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(1e-3, 1e3), min_size=24, max_size=24),
       st.floats(0.05, 0.99), st.floats(0.0, 4.0),
       st.sampled_from([1, 4]), st.sampled_from(["adaptive", "mean"]))
@pytest.mark.slow
def test_property_clipped_below_threshold_identity_otherwise(
    norms, alpha, z_thresh, warmup, mode):
  tx = optax.inject_hyperparams(oc.zclip, static_args="mode")(
      alpha, z_thresh, warmup, mode=mode)
  state = tx.init(tree_with_norm(1.0))
  out, threshold, norm, same, spike = _scanned_run(warmup, mode)(
      state, batch_of_trees(norms))
  out, threshold, norm = map(np.asarray, (out, threshold, norm))
  assert np.all(out <= threshold * (1 + 1e-5))
  assert np.all(np.asarray(same)[norm <= threshold])
  assert not np.any(np.asarray(spike)[:warmup])
  expected = ref.zclip(norms, alpha=alpha, z_thresh=z_thresh,
                       warmup_steps=warmup, mode=mode)
  # Compare up to the first norm within rounding of the spike boundary,
  # where float32 and float64 may decide differently.
  near = [abs(s.boundary - n) <= 1e-4 * abs(n) for n, s in zip(norms, expected)]
  stop = near.index(True) if True in near else len(norms)
  np.testing.assert_allclose(out[:stop],
                             [s.clipped_norm for s in expected][:stop],
                             rtol=1e-4)


@functools.cache
def _scanned_run(warmup, mode):
  """One compiled run per warm-up length and mode; the rest is in the state."""
  tx = optax.inject_hyperparams(oc.zclip, static_args="mode")(
      warmup_steps=warmup, mode=mode)

  def step(state, g):
    updates, state = tx.update(g, state)
    same = jnp.all(jnp.stack([jnp.all(u == x) for u, x in zip(
        jax.tree.leaves(updates), jax.tree.leaves(g))]))
    s = state.inner_state
    return state, (oc.global_norm(updates), s.threshold, s.grad_norm, same,
                   s.spike)

  return jax.jit(lambda s, gs: jax.lax.scan(step, s, gs)[1])


def test_no_retrace_through_warmup_and_after():
  traces = []
  tx = oc.zclip(warmup_steps=25, max_norm=10.0)

  @jax.jit
  def update(g, state):
    traces.append(1)  # Runs only when jax traces.
    return tx.update(g, state)

  state = tx.init(tree_with_norm(1.0))
  for n in ref.spiky_norms(200, {50: 30.0, 120: 5.0}, seed=3):
    _, state = update(tree_with_norm(n), state)
  assert len(traces) == 1 and update._cache_size() == 1
  assert int(state.count) == 200 and int(state.num_clipped) >= 2


def test_no_host_transfer_under_jit():
  tx = oc.zclip(warmup_steps=2, max_norm=5.0, skip_update_on_spike=True)
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
  kw = dict(alpha=0.9, z_thresh=2.0, warmup_steps=10, max_norm=4.0)
  tx = optax.inject_hyperparams(oc.zclip)(**kw)
  state = tx.init(tree_with_norm(1.0))
  update = jax.jit(tx.update)
  norms = NORMS[:60]
  for n, e in zip(norms, ref.zclip(norms, **kw)):
    updates, state = update(tree_with_norm(n), state)
    np.testing.assert_allclose(optax.tree.get(state, "threshold"),
                               e.threshold, rtol=2e-5)
    np.testing.assert_allclose(np_norm(updates), e.clipped_norm, rtol=2e-5)
  assert optax.tree.get(state, "warmup_norms").shape == (10,)
  state.hyperparams["max_norm"] = jnp.asarray(0.5)
  updates, state = update(tree_with_norm(1.0), state)
  np.testing.assert_allclose(oc.global_norm(updates), 0.5, rtol=1e-6)


def test_schedules():
  # z_thresh falls to 0 at step 3: every norm above the mean is a spike.
  tx = oc.zclip(z_thresh=optax.linear_schedule(3.0, 0.0, 3), warmup_steps=2,
                mode="mean", max_norm=optax.constant_schedule(100.0))
  state = tx.init(tree_with_norm(1.0))
  for n in (1.0, 3.0, 2.5):  # Mean 2, std 1; z = 0.5 < 1 (z_thresh at step 2).
    updates, state = tx.update(tree_with_norm(n), state)
  assert not bool(state.spike)
  updates, state = tx.update(tree_with_norm(3.0), state)  # z_thresh now 0.
  assert bool(state.spike)
  np.testing.assert_allclose(oc.global_norm(updates), 0.97 * 2 + 0.03 * 2.5,
                             rtol=1e-5)


def test_stats_and_tree_get():
  opt = optax.chain(oc.zclip(warmup_steps=2), optax.adam(1e-3))
  params = tree_with_norm(1.0)
  state = opt.init(params)
  for n in (1.0, 3.0, 2.0):
    _, state = opt.update(tree_with_norm(n), state, params)
  stats = oc.clip_stats(state)
  for key in ("grad_norm", "threshold", "scale", "clipped", "num_clipped",
              "mean", "var", "spike", "z", "fill", "warmup_norms", "count"):
    assert f"zclip/{key}" in stats
  mean = 0.97 * 2.0 + 0.03 * 2.0
  np.testing.assert_allclose(stats["zclip/mean"], mean, rtol=1e-6)
  np.testing.assert_allclose(optax.tree.get(state, "var"),
                             0.97 * 1.0 + 0.03 * (2.0 - mean) ** 2, rtol=1e-5)
  np.testing.assert_allclose(optax.tree.get(state, "threshold"),
                             2.0 + 2.5 * (1.0 + 1e-6), rtol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha=0.0), "alpha"), (dict(alpha=1.0), "alpha"),
    (dict(alpha=1.5), "alpha"), (dict(alpha=float("nan")), "alpha"),
    (dict(z_thresh=-1.0), "z_thresh"), (dict(max_norm=-1.0), "max_norm"),
    (dict(max_norm=float("nan")), "max_norm"),
    (dict(warmup_steps=0), "warmup_steps"), (dict(mode="zscore"), "mode"),
    (dict(eps=-1e-6), "eps"), (dict(ord=0), "ord"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
  with pytest.raises(ValueError, match=match):
    oc.zclip(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(warmup_steps=2.5), "warmup_steps"), (dict(alpha="x"), "alpha"),
    (dict(max_norm="big"), "max_norm"),
])
def test_bad_argument_types_raise_type_error(kwargs, match):
  with pytest.raises(TypeError, match=match):
    oc.zclip(**kwargs)


class VariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_warmup_then_clip(self):
    tx = oc.zclip(warmup_steps=3, z_thresh=1.0, mode="mean")
    update = self.variant(tx.update)
    state = tx.init(jnp.zeros(2))
    for n in (1.0, 2.0, 3.0, 10.0):
      updates, state = update(jnp.array([n, 0.0]), state)
    np.testing.assert_allclose(updates, [2.0, 0.0], rtol=1e-6)
    self.assertTrue(bool(state.spike))
    self.assertEqual(int(state.num_clipped), 1)

  @chex.variants(with_jit=True, without_jit=True)
  def test_output_dtype_matches_input(self):
    g = {"h": jnp.ones(4, jnp.bfloat16), "f": jnp.ones(2, jnp.float32)}
    tx = oc.zclip(warmup_steps=1, max_norm=1.0)
    updates, state = self.variant(tx.update)(g, tx.init(g))
    chex.assert_trees_all_equal_dtypes(updates, g)
    self.assertEqual(state.mean.dtype, jnp.float32)
    np.testing.assert_allclose(oc.global_norm(updates), 1.0, rtol=1e-2)


def test_jitted_init_under_inject_hyperparams_needs_static_warmup_steps():
  g = tree_with_norm(1.0)
  tx = optax.inject_hyperparams(oc.zclip)(warmup_steps=4)
  with pytest.raises(TypeError, match=r"static_args=\('warmup_steps',\)"):
    jax.jit(tx.init)(g)
  tx = optax.inject_hyperparams(oc.zclip, static_args="warmup_steps")(
      warmup_steps=4)
  state = jax.jit(tx.init)(g)
  assert optax.tree.get(state, "warmup_norms").shape == (4,)
