"""clip_by_quantile (AutoClip): float64 reference, ring buffer, jit, errors."""

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
from optaxclip._quantile import sorted_quantile, sorted_replace
from tests import _references as ref

DIRECTION = {"a": np.linspace(-1.0, 2.0, 6).reshape(2, 3),
             "b": np.array([0.5, -0.25, 3.0])}


def tree_with_norm(norm, dtype=jnp.float32):
  """A two-leaf gradient whose global 2-norm is ``norm``."""
  return jax.tree.map(
      lambda d: jnp.asarray(d * (norm / _norm_np(DIRECTION)), dtype), DIRECTION)


def _norm_np(tree):
  return float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(tree))))


def batch_of_trees(norms):
  """A tree whose leaves are stacked over steps: step i has norm norms[i]."""
  n = np.asarray(norms, np.float64)[:, None]
  return jax.tree.map(
      lambda d: jnp.asarray(d.reshape(1, -1) * n / _norm_np(DIRECTION),
                            jnp.float32).reshape((len(norms),) + d.shape),
      DIRECTION)


def run_scan(tx, norms):
  """Runs ``tx`` over a sequence of gradients with the given norms under scan."""
  grads = batch_of_trees(norms)
  state = tx.init(jax.tree.map(lambda x: x[0], grads))

  def step(state, g):
    updates, state = tx.update(g, state)
    return state, (oc.global_norm(updates), state)

  _, (out_norms, states) = jax.jit(lambda s, g: jax.lax.scan(step, s, g))(
      state, grads)
  return np.asarray(out_norms, np.float64), states


SPIKES = {30: 20.0, 31: 8.0, 77: 50.0, 150: 0.05, 151: 30.0}


class ReferenceTest(parameterized.TestCase):

  @parameterized.parameters(
      (0.9, 1000), (0.5, 16), (0.0, 7), (1.0, 7), (0.25, 1), (0.99, 64))
  def test_matches_float64_reference_step_by_step(self, q, history):
    norms = ref.spiky_norms(200, SPIKES, seed=1, drift=2.0)
    expected = ref.autoclip(norms, q, history)
    out, states = run_scan(oc.clip_by_quantile(q, history), norms)
    np.testing.assert_allclose(states.grad_norm, norms, rtol=1e-5)
    np.testing.assert_allclose(
        states.threshold, [s.threshold for s in expected], rtol=1e-5)
    np.testing.assert_allclose(out, [s.clipped_norm for s in expected],
                               rtol=1e-5)
    np.testing.assert_array_equal(
        np.asarray(states.fill), np.minimum(np.arange(1, 201), history))
    self.assertEqual(int(states.num_clipped[-1]),
                     sum(s.clipped for s in expected))

  def test_spikes_are_clipped_and_rest_pass(self):
    norms = ref.spiky_norms(200, SPIKES, seed=2)
    out, states = run_scan(oc.clip_by_quantile(0.9, 100), norms)
    for i in (30, 77, 151):  # Planted spikes: cut to the window's quantile.
      self.assertTrue(bool(states.clipped[i]))
      self.assertLess(out[i], 2.0)

  def test_per_leaf_matches_reference_per_leaf(self):
    rng = np.random.default_rng(3)
    steps = 60
    na = ref.spiky_norms(steps, {10: 30.0}, seed=4)
    nb = ref.spiky_norms(steps, {40: 30.0}, seed=5, base=0.1)
    da, db = rng.standard_normal((4, 3)), rng.standard_normal(5)
    grads = {"a": jnp.asarray(na[:, None, None] * da / np.linalg.norm(da),
                              jnp.float32),
             "b": jnp.asarray(nb[:, None] * db / np.linalg.norm(db),
                              jnp.float32)}
    tx = oc.clip_by_quantile(0.8, 20, per_leaf=True)
    state = tx.init(jax.tree.map(lambda x: x[0], grads))
    update = jax.jit(tx.update)
    exp_a, exp_b = ref.autoclip(na, 0.8, 20), ref.autoclip(nb, 0.8, 20)
    for i in range(steps):
      updates, state = update(jax.tree.map(lambda x, i=i: x[i], grads), state)
      for key, exp in (("a", exp_a[i]), ("b", exp_b[i])):
        np.testing.assert_allclose(state.threshold[key], exp.threshold,
                                   rtol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(updates[key]),
                                   exp.clipped_norm, rtol=1e-5)
    self.assertEqual(state.norm_history.shape, (2, 20))


@pytest.mark.parametrize("q, history", [(0.9, 1000), (0.5, 16), (0.0, 7),
                                        (1.0, 7), (0.25, 1), (0.99, 64)])
def test_package_form_matches_float64_reference(q, history):
  norms = ref.spiky_norms(200, SPIKES, seed=1, drift=2.0)
  norms[60] = np.nan  # Kept out of the history.
  expected = ref.autoclip_package(norms, q, history)
  out, states = run_scan(
      oc.clip_by_quantile(q, history, include_current=False), norms)
  np.testing.assert_allclose(
      states.threshold, [s.threshold for s in expected], rtol=1e-5)
  ok = np.isfinite(norms)
  np.testing.assert_allclose(out[ok], np.array(
      [s.clipped_norm for s in expected])[ok], rtol=1e-5)
  assert float(states.threshold[0]) == np.inf and not bool(states.clipped[0])
  assert int(states.num_clipped[-1]) == sum(s.clipped for s in expected)
  # The paper's form differs on the steps whose norm tops the window.
  if q < 1 and history > 1:
    paper = ref.autoclip(norms, q, history)
    assert any(a.threshold != b.threshold for a, b in zip(paper, expected))


def test_package_form_clips_a_spike_the_paper_form_lets_through():
  # With quantile 1 the paper's threshold is the window's max, the spike
  # included: nothing is ever clipped. The package's max excludes it.
  norms = [1.0, 1.0, 1.0, 50.0]
  paper, _ = run_scan(oc.clip_by_quantile(1.0, 4), norms)
  package, _ = run_scan(oc.clip_by_quantile(1.0, 4, include_current=False),
                        norms)
  np.testing.assert_allclose(paper, norms, rtol=1e-6)
  np.testing.assert_allclose(package, [1.0, 1.0, 1.0, 1.0], rtol=1e-6)


def test_package_form_per_leaf_matches_reference():
  steps = 40
  rng = np.random.default_rng(8)
  na = ref.spiky_norms(steps, {10: 30.0}, seed=4)
  nb = ref.spiky_norms(steps, {25: 30.0}, seed=5, base=0.1)
  da, db = rng.standard_normal((4, 3)), rng.standard_normal(5)
  grads = {"a": jnp.asarray(na[:, None, None] * da / np.linalg.norm(da),
                            jnp.float32),
           "b": jnp.asarray(nb[:, None] * db / np.linalg.norm(db),
                            jnp.float32)}
  tx = oc.clip_by_quantile(0.9, 10, per_leaf=True, include_current=False)
  state = tx.init(jax.tree.map(lambda x: x[0], grads))
  update = jax.jit(tx.update)
  exp = {"a": ref.autoclip_package(na, 0.9, 10),
         "b": ref.autoclip_package(nb, 0.9, 10)}
  for i in range(steps):
    updates, state = update(jax.tree.map(lambda x, i=i: x[i], grads), state)
    for key in ("a", "b"):
      np.testing.assert_allclose(state.threshold[key], exp[key][i].threshold,
                                 rtol=1e-5)
      np.testing.assert_allclose(np.linalg.norm(updates[key]),
                                 exp[key][i].clipped_norm, rtol=1e-5)


def test_package_form_inject_hyperparams():
  norms = ref.spiky_norms(30, {20: 10.0}, seed=6)
  expected = ref.autoclip_package(norms, 0.7, 8)
  tx = optax.inject_hyperparams(oc.clip_by_quantile)(
      quantile=0.7, history=8, include_current=False)
  state = tx.init(tree_with_norm(1.0))
  update = jax.jit(tx.update)
  for n, e in zip(norms, expected):
    _, state = update(tree_with_norm(n), state)
    np.testing.assert_allclose(optax.tree.get(state, "threshold"),
                               e.threshold, rtol=1e-5)


class PackageFormVariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_first_step_unclipped_then_previous_norms(self):
    tx = oc.clip_by_quantile(0.5, 3, include_current=False)
    update = self.variant(tx.update)
    state = tx.init(jnp.zeros(2))
    outs = []
    for n in (5.0, 1.0, 3.0, 10.0, 0.5):
      updates, state = update(jnp.array([n, 0.0]), state)
      outs.append(float(updates[0]))
    np.testing.assert_allclose(outs, [5.0, 1.0, 3.0, 3.0, 0.5], rtol=1e-6)
    self.assertEqual(int(state.num_clipped), 1)


def test_include_current_must_be_bool():
  with pytest.raises(TypeError, match="include_current"):
    oc.clip_by_quantile(include_current="yes")


def test_first_step_is_not_clipped():
  for norm in (1e-3, 1.0, 1e6):
    tx = oc.clip_by_quantile(0.1, 10)
    g = tree_with_norm(norm)
    updates, state = tx.update(g, tx.init(g))
    chex.assert_trees_all_equal(updates, g)
    assert not bool(state.clipped) and float(state.scale) == 1.0
    np.testing.assert_allclose(state.threshold, norm, rtol=1e-6)


def test_zero_gradient_is_left_alone():
  tx = oc.clip_by_quantile(0.5, 4)
  g = {"w": jnp.zeros(3)}
  updates, state = tx.update(g, tx.init(g))
  chex.assert_trees_all_equal(updates, g)
  assert float(state.scale) == 1.0 and not bool(state.clipped)


def test_nonfinite_norm_is_not_recorded():
  tx = oc.clip_by_quantile(0.5, 4)
  update = jax.jit(tx.update)
  state = tx.init({"w": jnp.zeros(2)})
  _, state = update({"w": jnp.array([3.0, 4.0])}, state)
  updates, state = update({"w": jnp.array([jnp.nan, 1.0])}, state)
  assert bool(jnp.isnan(updates["w"][0]))
  assert int(state.fill) == 1 and int(state.index) == 1
  _, state = update({"w": jnp.array([0.0, 1.0])}, state)
  np.testing.assert_allclose(state.threshold, 3.0)  # median of 5 and 1
  assert int(state.fill) == 2


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=12),
       st.floats(0.0, 1.0), st.integers(1, 12))
def test_sorted_quantile_matches_numpy(values, q, size):
  values = np.sort(np.asarray(values[:size], np.float32))
  buf = np.full(size, np.inf, np.float32)
  buf[:len(values)] = values
  got = sorted_quantile(jnp.asarray(buf), jnp.asarray(len(values)),
                        jnp.asarray(q))
  np.testing.assert_allclose(got, np.quantile(values.astype(np.float64), q),
                             rtol=1e-5)


_sorted_replace = jax.jit(sorted_replace)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0, 7.0]), min_size=1,
                max_size=20), st.integers(1, 6))
def test_sorted_copy_tracks_the_ring_buffer(values, size):
  # Duplicates included: one removal and one insertion per step keep the
  # sorted copy equal to the sorted window, bit for bit.
  ring = np.zeros(size, np.float32)
  ordered = jnp.full((2, size), jnp.inf, jnp.float32)  # Two rows, as per leaf.
  for i, v in enumerate(values):
    old = ring[i % size] if i >= size else np.inf
    new = jnp.asarray([v, -v], jnp.float32)
    ordered = _sorted_replace(ordered, jnp.asarray([old, -old if i >= size
                                                   else np.inf], jnp.float32),
                             new)
    ring[i % size] = v
    fill = min(i + 1, size)
    want = np.full(size, np.inf, np.float32)
    want[:fill] = np.sort(ring[:fill])
    np.testing.assert_array_equal(ordered[0], want)
    want[:fill] = np.sort(-ring[:fill])
    np.testing.assert_array_equal(ordered[1], want)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(1e-4, 1e4), min_size=20, max_size=20),
       st.floats(0.0, 1.0), st.sampled_from([1, 3, 8]))
def test_property_clipped_below_threshold_identity_otherwise(norms, q, size):
  tx = optax.inject_hyperparams(oc.clip_by_quantile)(q, size)
  state = tx.init(tree_with_norm(1.0))
  out, threshold, norm, same = _scanned_run(size)(state, batch_of_trees(norms))
  assert np.all(np.asarray(out) <= np.asarray(threshold) * (1 + 1e-5))
  assert np.all(np.asarray(same)[np.asarray(norm) <= np.asarray(threshold)])


@functools.cache
def _scanned_run(size):
  """One compiled run per buffer size; the quantile lives in the state."""
  tx = optax.inject_hyperparams(oc.clip_by_quantile)(0.5, size)

  def step(state, g):
    updates, state = tx.update(g, state)
    same = jnp.all(jnp.stack([jnp.all(u == x) for u, x in zip(
        jax.tree.leaves(updates), jax.tree.leaves(g))]))
    inner = state.inner_state
    return state, (oc.global_norm(updates), inner.threshold, inner.grad_norm,
                   same)

  return jax.jit(lambda s, gs: jax.lax.scan(step, s, gs)[1])


def test_no_retrace_as_buffer_fills_and_wraps():
  traces = []
  tx = oc.clip_by_quantile(0.9, 50)

  @jax.jit
  def update(g, state):
    traces.append(1)  # Runs only when jax traces.
    return tx.update(g, state)

  g = tree_with_norm(1.0)
  state = tx.init(g)
  for i in range(200):
    _, state = update(tree_with_norm(1.0 + (i % 7)), state)
  assert len(traces) == 1
  assert int(state.fill) == 50 and int(state.count) == 200
  assert update._cache_size() == 1


def test_no_host_transfer_under_jit():
  tx = oc.clip_by_quantile(0.9, 32, per_leaf=False)
  update = jax.jit(tx.update)
  g = jax.device_put(tree_with_norm(2.0))
  state = jax.device_put(tx.init(g))
  updates, state = update(g, state)  # Compile outside the guard.
  with jax.transfer_guard("disallow"):
    for _ in range(5):
      updates, state = update(g, state)
    jax.block_until_ready((updates, state))
  # The guard raises on any host transfer; the steps also did their work.
  assert int(state.count) == 6 and int(state.fill) == 6
  tx2 = oc.clip_by_quantile(0.5, 8, per_leaf=True)
  update2 = jax.jit(tx2.update)
  state2 = jax.device_put(tx2.init(g))
  update2(g, state2)
  with jax.transfer_guard("disallow"):
    _, state2 = jax.block_until_ready(update2(g, state2))
  assert int(state2.count) == 1


def test_inject_hyperparams():
  norms = ref.spiky_norms(40, {20: 10.0}, seed=6)
  expected = ref.autoclip(norms, 0.7, 8)
  tx = optax.inject_hyperparams(oc.clip_by_quantile)(quantile=0.7, history=8)
  state = tx.init(tree_with_norm(1.0))
  update = jax.jit(tx.update)
  for n, e in zip(norms, expected):
    updates, state = update(tree_with_norm(n), state)
    np.testing.assert_allclose(optax.tree.get(state, "threshold"),
                               e.threshold, rtol=1e-5)
  assert optax.tree.get(state, "norm_history").shape == (8,)
  # A new quantile set in the state takes effect at the next step.
  state.hyperparams["quantile"] = jnp.asarray(0.0)
  _, state = update(tree_with_norm(100.0), state)
  window = np.concatenate([norms[-7:], [100.0]])
  np.testing.assert_allclose(optax.tree.get(state, "threshold"),
                             window.min(), rtol=1e-5)


def test_inject_hyperparams_per_leaf_with_traced_ord():
  tx = optax.inject_hyperparams(oc.clip_by_quantile)(0.5, 4, per_leaf=True)
  g = tree_with_norm(3.0)
  state = tx.init(g)
  updates, state = jax.jit(tx.update)(g, state)
  chex.assert_trees_all_close(updates, g)


def test_schedule_quantile():
  sched = optax.linear_schedule(1.0, 0.0, 2)
  tx = oc.clip_by_quantile(sched, 10)
  state = tx.init(tree_with_norm(1.0))
  for n in (1.0, 2.0, 3.0):
    _, state = tx.update(tree_with_norm(n), state)
  np.testing.assert_allclose(state.threshold, 1.0, rtol=1e-6)  # q=0 at step 2


def test_stats_and_tree_get():
  opt = optax.chain(oc.clip_by_quantile(0.5, 5), optax.sgd(0.1))
  params = tree_with_norm(1.0)
  state = opt.init(params)
  for n in (1.0, 4.0):
    _, state = opt.update(tree_with_norm(n), state, params)
  stats = oc.clip_stats(state)
  for key in ("grad_norm", "threshold", "scale", "clipped", "num_clipped",
              "norm_history", "sorted_norms", "fill", "count"):
    assert f"clip_by_quantile/{key}" in stats
  np.testing.assert_allclose(stats["clip_by_quantile/threshold"], 2.5, rtol=1e-6)
  np.testing.assert_allclose(stats["clip_by_quantile/scale"], 2.5 / 4.0, rtol=1e-6)
  assert int(stats["clip_by_quantile/fill"]) == 2
  np.testing.assert_allclose(optax.tree.get(state, "threshold"), 2.5,
                             rtol=1e-6)


def test_masked_leaves_pass_through():
  params = {"w": jnp.ones(3), "step": jnp.zeros((), jnp.int32)}
  tx = optax.masked(oc.clip_by_quantile(0.5, 4, per_leaf=True),
                    {"w": True, "step": False})
  state = tx.init(params)
  grads = {"w": jnp.array([3.0, 4.0, 0.0]), "step": jnp.zeros((), jnp.int32)}
  updates, state = tx.update(grads, state, params)
  chex.assert_trees_all_equal(updates, grads)


@pytest.mark.parametrize("kwargs, match", [
    (dict(quantile=-0.1), "quantile"), (dict(quantile=1.5), "quantile"),
    (dict(quantile=float("nan")), "quantile"), (dict(history=0), "history"),
    (dict(quantile=jnp.ones(2)), "quantile"), (dict(ord=-1), "ord"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
  with pytest.raises(ValueError, match=match):
    oc.clip_by_quantile(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(history=2.5), "history"), (dict(quantile="high"), "quantile"),
    (dict(history=True), "history"),
])
def test_bad_argument_types_raise_type_error(kwargs, match):
  with pytest.raises(TypeError, match=match):
    oc.clip_by_quantile(**kwargs)


def test_integer_gradients_raise():
  tx = oc.clip_by_quantile()
  with pytest.raises(TypeError, match="dtype"):
    tx.init({"w": jnp.zeros(3, jnp.int32)})


class VariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_clips_to_quantile(self):
    tx = oc.clip_by_quantile(0.5, 3)
    update = self.variant(tx.update)
    state = tx.init(jnp.zeros(2))
    outs = []
    for n in (1.0, 3.0, 2.0, 10.0):
      updates, state = update(jnp.array([n, 0.0]), state)
      outs.append(float(updates[0]))
    np.testing.assert_allclose(outs, [1.0, 2.0, 2.0, 3.0], rtol=1e-6)
    np.testing.assert_array_equal(state.norm_history, [10.0, 3.0, 2.0])
    self.assertEqual(int(state.num_clipped), 2)

  @chex.variants(with_jit=True, without_jit=True)
  def test_output_dtype_matches_input(self):
    g = {"h": jnp.ones(4, jnp.bfloat16), "f": jnp.ones(2, jnp.float32)}
    tx = oc.clip_by_quantile(0.5, 3)
    updates, state = self.variant(tx.update)(g, tx.init(g))
    chex.assert_trees_all_equal_dtypes(updates, g)
    self.assertEqual(state.threshold.dtype, jnp.float32)



def test_jitted_init_under_inject_hyperparams_needs_static_history():
  g = tree_with_norm(1.0)
  tx = optax.inject_hyperparams(oc.clip_by_quantile)(0.5, 6)
  with pytest.raises(TypeError, match=r"static_args=\('history',\)"):
    jax.jit(tx.init)(g)
  tx = optax.inject_hyperparams(oc.clip_by_quantile, static_args="history")(
      0.5, 6)
  state = jax.jit(tx.init)(g)
  assert optax.tree.get(state, "norm_history").shape == (6,)
