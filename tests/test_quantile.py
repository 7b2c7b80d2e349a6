"""clip_by_quantile (AutoClip): float64 reference, ring buffer, jit, errors."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optaxclip as oc
from optaxclip._quantile import sorted_quantile, sorted_replace
from tests import _references as ref
from tests._helpers import JIT, batch_of_trees, maybe_jit, run_norms, run_scan, tree_with_norm

SPIKES = {30: 20.0, 31: 8.0, 77: 50.0, 150: 0.05, 151: 30.0}


@functools.cache
def _runner(window, include_current=True, follow=False):
  """One compiled run per window and form: the quantile is traced."""

  def run(q, grads):
    tx = oc.clip_by_quantile(q, window=window,
                             include_current=include_current, follow=follow)
    updates, states = run_scan(tx, grads)
    return jax.vmap(oc.global_norm)(updates), states

  return jax.jit(run)


def run_quantile(q, window, norms, include_current=True, follow=False):
  out, states = _runner(window, include_current, follow)(
      jnp.float32(q), batch_of_trees(norms))
  return np.asarray(out, np.float64), states


def following(norms, q, window, include_current=True):
  """``follow=True`` in float64: each finite norm recorded over a level
  (an EMA of decay 0.9 of the earlier finite norms, the first norm its
  own), the threshold the level times ``np.quantile`` of the last
  ``window`` ratios (the current one included, or not)."""
  record, level, out = [], 0.0, []
  for g in map(float, norms):
    now = level if level > 0 else g
    before = list(record)
    if np.isfinite(g):
      record = (record + [g / now if now > 0 else 1.0])[-window:]
      level = 0.9 * level + 0.1 * g if level > 0 else g
    use = record if include_current else before
    t = now * float(np.quantile(use, q)) if use else np.inf
    out.append(ref.Step(threshold=t, clipped_norm=min(g, t), clipped=g > t))
  return out


WINDOWS = [(0.9, 1000), (0.5, 16), (0.0, 7), (1.0, 7), (0.25, 1), (0.99, 64)]


@pytest.mark.parametrize("q, window", WINDOWS)
@pytest.mark.slow
def test_matches_float64_reference_step_by_step(q, window):
  norms = ref.spiky_norms(200, SPIKES, seed=1, drift=2.0)
  expected = ref.autoclip(norms, q, window)
  out, states = run_quantile(q, window, norms)
  np.testing.assert_allclose(states.stats.norm, norms, rtol=1e-5)
  np.testing.assert_allclose(
      states.stats.threshold, [s.threshold for s in expected], rtol=1e-5)
  np.testing.assert_allclose(out, [s.clipped_norm for s in expected],
                             rtol=1e-5)
  np.testing.assert_array_equal(
      np.asarray(states.fill), np.minimum(np.arange(1, 201), window))
  assert int(states.stats.num_clipped[-1]) == sum(s.clipped for s in expected)


@pytest.mark.slow
def test_spikes_are_clipped_and_rest_pass():
  norms = ref.spiky_norms(200, SPIKES, seed=2)
  out, states = run_norms(oc.clip_by_quantile(0.9, window=100), norms)
  for i in (30, 77, 151):  # Planted spikes: cut to the window's quantile.
    assert bool(states.stats.clipped[i])
    assert out[i] < 2.0


def _two_leaf_grads(steps, spike_b, seed_dir):
  """Two tensors with their own norm sequences (a spike in each)."""
  rng = np.random.default_rng(seed_dir)
  na = ref.spiky_norms(steps, {10: 30.0}, seed=4)
  nb = ref.spiky_norms(steps, {spike_b: 30.0}, seed=5, base=0.1)
  da, db = rng.standard_normal((4, 3)), rng.standard_normal(5)
  grads = {"a": jnp.asarray(na[:, None, None] * da / np.linalg.norm(da),
                            jnp.float32),
           "b": jnp.asarray(nb[:, None] * db / np.linalg.norm(db),
                            jnp.float32)}
  return grads, {"a": na, "b": nb}


@pytest.mark.parametrize("include_current, q, window, steps, spike_b, seed,"
                         " follow", [
    (True, 0.8, 20, 60, 40, 3, False), (False, 0.9, 10, 40, 25, 8, False),
    pytest.param(True, 0.8, 20, 60, 40, 3, True, marks=pytest.mark.slow),
], ids=["paper", "package", "following"])
def test_per_leaf_matches_reference_per_leaf(include_current, q, window,
                                             steps, spike_b, seed, follow):
  grads, norms = _two_leaf_grads(steps, spike_b, seed)
  tx = oc.clip_by_quantile(q, window=window, per_leaf=True,
                           include_current=include_current, follow=follow)
  updates, states = run_scan(tx, grads)
  form = ref.autoclip if include_current else ref.autoclip_package
  if follow:
    form = functools.partial(following, include_current=include_current)
  exp = {k: form(n, q, window) for k, n in norms.items()}
  for key in ("a", "b"):
    np.testing.assert_allclose(states.stats.threshold[key],
                               [e.threshold for e in exp[key]], rtol=1e-5)
    np.testing.assert_allclose(
        np.linalg.norm(np.asarray(updates[key]).reshape(steps, -1), axis=1),
        [e.clipped_norm for e in exp[key]], rtol=1e-5)
    np.testing.assert_allclose(states.stats.leaf_norms[key], norms[key],
                               rtol=1e-5)
  over = np.stack([[e.clipped for e in exp[k]] for k in ("a", "b")], axis=1)
  np.testing.assert_array_equal(states.stats.clipped, over.any(axis=1))
  np.testing.assert_allclose(states.stats.frac_clipped, over.mean(axis=1))
  np.testing.assert_allclose(
      states.stats.norm, np.maximum(norms["a"], norms["b"]), rtol=1e-5)
  kept = np.stack([[e.clipped_norm / n for e, n in zip(exp[k], norms[k])]
                   for k in ("a", "b")], axis=1)
  np.testing.assert_allclose(states.stats.scale, kept.min(axis=1), rtol=1e-5)
  assert states.norm_history.shape == (steps, 2, window)


@pytest.mark.parametrize("q, window", WINDOWS)
@pytest.mark.slow
def test_package_form_matches_float64_reference(q, window):
  norms = ref.spiky_norms(200, SPIKES, seed=1, drift=2.0)
  norms[60] = np.nan  # Kept out of the history.
  expected = ref.autoclip_package(norms, q, window)
  out, states = run_quantile(q, window, norms, include_current=False)
  threshold = np.asarray(states.stats.threshold)
  np.testing.assert_allclose(threshold, [s.threshold for s in expected],
                             rtol=1e-5)
  ok = np.isfinite(norms)
  np.testing.assert_allclose(out[ok], np.array(
      [s.clipped_norm for s in expected])[ok], rtol=1e-5)
  assert threshold[0] == np.inf and not bool(states.stats.clipped[0])
  assert int(states.stats.num_clipped[-1]) == sum(s.clipped for s in expected)
  # The paper's form differs on the steps whose norm tops the window.
  if q < 1 and window > 1:
    paper = ref.autoclip(norms, q, window)
    assert any(a.threshold != b.threshold for a, b in zip(paper, expected))


@pytest.mark.slow
@pytest.mark.parametrize("include_current", [False])
def test_following_matches_float64_reference(include_current):
  # A x4 rise over the run and a lasting x3 step, with spikes and a NaN.
  norms = ref.spiky_norms(160, SPIKES, seed=1, drift=3.0)
  norms[60:] *= 3.0
  norms[40] = np.nan
  expected = following(norms, 0.8, 16, include_current)
  out, states = run_quantile(0.8, 16, norms, include_current, follow=True)
  np.testing.assert_allclose(states.stats.threshold,
                             [s.threshold for s in expected], rtol=1e-5)
  ok = np.isfinite(norms)
  np.testing.assert_allclose(out[ok], np.array(
      [s.clipped_norm for s in expected])[ok], rtol=1e-5)
  # Where the norm is its own quantile, rounding decides.
  t = np.array([s.threshold for s in expected])
  clear = ~np.isclose(norms, t, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(states.stats.clipped)[clear],
                                np.array([s.clipped for s in expected])[clear])
  np.testing.assert_array_equal(states.level[40], states.level[39])
  # The published form clips far more of the rising run.
  published = ref.autoclip(norms, 0.8, 16) if include_current else (
      ref.autoclip_package(norms, 0.8, 16))
  assert sum(s.clipped for s in published) > sum(
      s.clipped for s in expected) + 10


def test_package_form_clips_a_spike_the_paper_form_lets_through():
  # With quantile 1 the paper's threshold is the window's max, the spike
  # included: nothing is ever clipped. The package's max excludes it.
  norms = [1.0, 1.0, 1.0, 50.0]
  paper, _ = run_quantile(1.0, 4, norms)
  package, _ = run_quantile(1.0, 4, norms, include_current=False)
  np.testing.assert_allclose(paper, norms, rtol=1e-6)
  np.testing.assert_allclose(package, [1.0, 1.0, 1.0, 1.0], rtol=1e-6)


@pytest.mark.parametrize("include_current, reference", [
    (True, ref.autoclip), (False, ref.autoclip_package)],
    ids=["paper", "package"])
def test_inject_hyperparams(include_current, reference):
  norms = ref.spiky_norms(40, {20: 10.0}, seed=6)
  expected = reference(norms, 0.7, 8)
  tx = optax.inject_hyperparams(oc.clip_by_quantile)(
      quantile=0.7, window=8, include_current=include_current, follow=False)
  state = tx.init(tree_with_norm(1.0))
  update = jax.jit(tx.update)
  for n, e in zip(norms, expected):
    _, state = update(tree_with_norm(n), state)
    np.testing.assert_allclose(state.inner_state.stats.threshold,
                               e.threshold, rtol=1e-5)
  assert optax.tree.get(state, "norm_history").shape == (8,)
  # A new quantile set in the state takes effect at the next step.
  state.hyperparams["quantile"] = jnp.asarray(0.0)
  _, state = update(tree_with_norm(100.0), state)
  window = norms[-8:] if not include_current else np.concatenate(
      [norms[-7:], [100.0]])
  np.testing.assert_allclose(state.inner_state.stats.threshold,
                             window.min(), rtol=1e-5)


@pytest.mark.parametrize(**JIT)
def test_package_form_first_step_unclipped_then_previous_norms(jitted):
  tx = oc.clip_by_quantile(0.5, window=3, include_current=False,
                           follow=False)
  update = maybe_jit(tx.update, jitted)
  state = tx.init(jnp.zeros(2))
  outs = []
  for n in (5.0, 1.0, 3.0, 10.0, 0.5):
    updates, state = update(jnp.array([n, 0.0]), state)
    outs.append(float(updates[0]))
  np.testing.assert_allclose(outs, [5.0, 1.0, 3.0, 3.0, 0.5], rtol=1e-6)
  assert int(state.stats.num_clipped) == 1


def test_first_step_is_not_clipped():
  # One compiled program for every input norm: the norm is traced.
  tx = oc.clip_by_quantile(0.1, window=10)

  def first_step(norm):
    g = tree_with_norm(norm)
    return (g, *tx.update(g, tx.init(g)))

  norms = jnp.asarray([1e-3, 1.0, 1e6], jnp.float32)
  grads, updates, states = jax.jit(jax.vmap(first_step))(norms)
  chex.assert_trees_all_equal(updates, grads)
  assert not np.any(states.stats.clipped)
  np.testing.assert_array_equal(states.stats.scale, 1.0)
  np.testing.assert_allclose(states.stats.threshold, norms, rtol=1e-6)


def test_zero_gradient_is_left_alone():
  tx = oc.clip_by_quantile(0.5, window=4)
  g = {"w": jnp.zeros(3)}
  updates, state = tx.update(g, tx.init(g))
  chex.assert_trees_all_equal(updates, g)
  assert float(state.stats.scale) == 1.0 and not bool(state.stats.clipped)


def test_nonfinite_norm_is_not_recorded():
  tx = oc.clip_by_quantile(0.5, window=4)
  update = jax.jit(tx.update)
  state = tx.init({"w": jnp.zeros(2)})
  _, state = update({"w": jnp.array([3.0, 4.0])}, state)
  updates, state = update({"w": jnp.array([jnp.nan, 1.0])}, state)
  assert bool(jnp.isnan(updates["w"][0]))
  assert int(state.fill) == 1 and int(state.index) == 1
  _, state = update({"w": jnp.array([0.0, 1.0])}, state)
  np.testing.assert_allclose(state.stats.threshold, 3.0)  # median of 5 and 1
  assert int(state.fill) == 2


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=12),
       st.floats(0.0, 1.0, allow_subnormal=False), st.integers(1, 12))
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
       st.floats(0.0, 1.0, allow_subnormal=False), st.sampled_from([1, 3, 8]))
def test_property_clipped_below_threshold_identity_otherwise(norms, q, size):
  out, threshold, norm, same = map(np.asarray, _scanned_run(size)(
      jnp.float32(q), batch_of_trees(norms)))
  assert np.all(out <= threshold * (1 + 1e-5))
  assert np.all(same[norm <= threshold])


@functools.cache
def _scanned_run(size):
  """One compiled run per buffer size; the quantile is traced."""

  def run(q, grads):
    tx = oc.clip_by_quantile(q, window=size)

    def step(state, g):
      updates, state = tx.update(g, state)
      same = jnp.all(jnp.stack([jnp.all(u == x) for u, x in zip(
          jax.tree.leaves(updates), jax.tree.leaves(g))]))
      return state, (oc.global_norm(updates), state.stats.threshold,
                     state.stats.norm, same)

    state = tx.init(jax.tree.map(lambda x: x[0], grads))
    return jax.lax.scan(step, state, grads)[1]

  return jax.jit(run)


def test_no_retrace_as_buffer_fills_and_wraps():
  traces = []
  tx = oc.clip_by_quantile(0.9, window=50)

  @jax.jit
  def update(g, state):
    traces.append(1)  # Runs only when jax traces.
    return tx.update(g, state)

  g = tree_with_norm(1.0)
  state = tx.init(g)
  for i in range(200):
    _, state = update(tree_with_norm(1.0 + (i % 7)), state)
  assert len(traces) == 1
  assert int(state.fill) == 50 and int(state.stats.count) == 200
  assert update._cache_size() == 1


@pytest.mark.parametrize("per_leaf", [False, True])
def test_no_host_transfer_under_jit(per_leaf):
  tx = oc.clip_by_quantile(0.9, window=32, per_leaf=per_leaf)
  update = jax.jit(tx.update)
  g = jax.device_put(tree_with_norm(2.0))
  state = jax.device_put(tx.init(g))
  updates, state = update(g, state)  # Compile outside the guard.
  with jax.transfer_guard("disallow"):
    for _ in range(5):
      updates, state = update(g, state)
    jax.block_until_ready((updates, state))
  # The guard raises on any host transfer; the steps also did their work.
  assert int(state.stats.count) == 6 and int(state.fill) == 6


def test_inject_hyperparams_per_leaf_with_traced_ord():
  tx = optax.inject_hyperparams(oc.clip_by_quantile)(0.5, window=4,
                                                     per_leaf=True)
  g = tree_with_norm(3.0)
  state = tx.init(g)
  updates, state = jax.jit(tx.update)(g, state)
  chex.assert_trees_all_close(updates, g)


def test_schedule_quantile():
  sched = optax.linear_schedule(1.0, 0.0, 2)
  tx = oc.clip_by_quantile(sched, window=10, follow=False)
  state = tx.init(tree_with_norm(1.0))
  for n in (1.0, 2.0, 3.0):
    _, state = tx.update(tree_with_norm(n), state)
  # q=0 at step 2.
  np.testing.assert_allclose(state.stats.threshold, 1.0, rtol=1e-6)


def test_stats_and_tree_get():
  opt = optax.chain(oc.clip_by_quantile(0.5, window=5, follow=False),
                    optax.sgd(0.1))
  params = tree_with_norm(1.0)
  state = opt.init(params)
  for n in (1.0, 4.0):
    _, state = opt.update(tree_with_norm(n), state, params)
  stats = oc.clip_stats(state)
  assert set(stats) == {f"clip_by_quantile/{k}" for k in (
      "count", "norm", "threshold", "scale", "clipped", "num_clipped",
      "norm_history", "sorted_norms", "fill", "index")}
  np.testing.assert_allclose(stats["clip_by_quantile/norm"], 4.0, rtol=1e-6)
  np.testing.assert_allclose(stats["clip_by_quantile/threshold"], 2.5,
                             rtol=1e-6)
  np.testing.assert_allclose(stats["clip_by_quantile/scale"], 2.5 / 4.0,
                             rtol=1e-6)
  assert int(stats["clip_by_quantile/fill"]) == 2
  np.testing.assert_allclose(optax.tree.get(state, "threshold"), 2.5,
                             rtol=1e-6)


def test_per_leaf_stats_by_path():
  opt = optax.chain(oc.clip_by_quantile(0.5, window=5, per_leaf=True),
                    optax.sgd(0.1))
  params = tree_with_norm(1.0)
  state = opt.init(params)
  for n in (1.0, 4.0):
    _, state = opt.update(tree_with_norm(n), state, params)
  stats = oc.clip_stats(state, scalars=True)
  want = jax.tree.map(lambda x: float(np.linalg.norm(x)), tree_with_norm(4.0))
  for key in ("a", "b"):
    np.testing.assert_allclose(stats[f"clip_by_quantile/leaf_norms/{key}"],
                               want[key], rtol=1e-6)
  np.testing.assert_allclose(stats["clip_by_quantile/norm"],
                             max(want.values()), rtol=1e-6)
  np.testing.assert_allclose(stats["clip_by_quantile/frac_clipped"], 1.0)


def test_masked_leaves_pass_through():
  params = {"w": jnp.ones(3), "step": jnp.zeros((), jnp.int32)}
  tx = optax.masked(oc.clip_by_quantile(0.5, window=4, per_leaf=True),
                    {"w": True, "step": False})
  state = tx.init(params)
  grads = {"w": jnp.array([3.0, 4.0, 0.0]), "step": jnp.zeros((), jnp.int32)}
  updates, state = tx.update(grads, state, params)
  chex.assert_trees_all_equal(updates, grads)


@pytest.mark.parametrize("kwargs, match", [
    (dict(quantile=-0.1), "quantile"), (dict(quantile=1.5), "quantile"),
    (dict(quantile=float("nan")), "quantile"), (dict(window=0), "window"),
    (dict(quantile=jnp.ones(2)), "quantile"),
    (dict(per_leaf=True, leaf_norms=True), "leaf_norms"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
  with pytest.raises(ValueError, match=match):
    oc.clip_by_quantile(**kwargs)


@pytest.mark.parametrize("args, kwargs, match", [
    ((), dict(window=2.5), "window"), ((), dict(quantile="high"), "quantile"),
    ((), dict(window=True), "window"),
    ((), dict(include_current="yes"), "include_current"),
    ((), dict(history=8), r"history= is now window="),
    ((), dict(ord=1), r"ord=.*removed.*2-norm"),
    ((), dict(follow=None), "follow"),
    ((0.5, 8), {}, "positional"),
])
def test_bad_arguments_raise_type_error(args, kwargs, match):
  with pytest.raises(TypeError, match=match):
    oc.clip_by_quantile(*args, **kwargs)


def test_integer_gradients_raise():
  tx = oc.clip_by_quantile()
  with pytest.raises(TypeError, match="dtype"):
    tx.init({"w": jnp.zeros(3, jnp.int32)})


@pytest.mark.parametrize(**JIT)
def test_clips_to_quantile(jitted):
  tx = oc.clip_by_quantile(0.5, window=3, follow=False)
  update = maybe_jit(tx.update, jitted)
  state = tx.init(jnp.zeros(2))
  outs = []
  for n in (1.0, 3.0, 2.0, 10.0):
    updates, state = update(jnp.array([n, 0.0]), state)
    outs.append(float(updates[0]))
  np.testing.assert_allclose(outs, [1.0, 2.0, 2.0, 3.0], rtol=1e-6)
  np.testing.assert_array_equal(state.norm_history, [10.0, 3.0, 2.0])
  assert int(state.stats.num_clipped) == 2


@pytest.mark.parametrize(**JIT)
def test_output_dtype_matches_input(jitted):
  g = {"h": jnp.ones(4, jnp.bfloat16), "f": jnp.ones(2, jnp.float32)}
  tx = oc.clip_by_quantile(0.5, window=3)
  updates, state = maybe_jit(tx.update, jitted)(g, tx.init(g))
  chex.assert_trees_all_equal_dtypes(updates, g)
  assert state.stats.threshold.dtype == jnp.float32


def test_jitted_init_under_inject_hyperparams_needs_static_window():
  g = tree_with_norm(1.0)
  tx = optax.inject_hyperparams(oc.clip_by_quantile)(0.5, window=6)
  with pytest.raises(TypeError, match=r"static_args=\('window',\)"):
    jax.jit(tx.init)(g)
  tx = optax.inject_hyperparams(oc.clip_by_quantile, static_args="window")(
      0.5, window=6)
  state = jax.jit(tx.init)(g)
  assert optax.tree.get(state, "norm_history").shape == (6,)
