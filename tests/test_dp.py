"""dp_aggregate, dp_noise and quantile_norm: optax parity, noise, statistics."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest

import optaxclip as oc
from optaxclip import _stats
from tests import _dp_references as ref
from tests.test_per_example import leaves64, model_case, per_example_tree, vmap_reference


def one_example(grads):
  return jax.tree.map(lambda x: jnp.zeros(x.shape[1:], x.dtype), grads)


class DPAggregateTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_optax_without_noise(self):
    ours = optax.chain(oc.dp_aggregate(1.0, 0.0, seed=0), optax.sgd(0.1))
    theirs = optax.chain(
        optax.contrib.differentially_private_aggregate(
            1.0, 0.0, key=jax.random.key(0)), optax.sgd(0.1))
    params = one_example(per_example_tree())
    s1, s2 = ours.init(params), theirs.init(params)
    for seed in range(3):
      grads = per_example_tree(seed=seed)
      u1, s1 = self.variant(ours.update)(grads, s1, params)
      u2, s2 = self.variant(theirs.update)(grads, s2, params)
      chex.assert_trees_all_close(u1, u2, rtol=1e-6, atol=1e-8)
    want, _, _, _ = ref.per_example_clip(leaves64(grads), 1.0)
    for got, w in zip(jax.tree.leaves(u1), want):
      np.testing.assert_allclose(got, -0.1 * w / 6, rtol=1e-5, atol=1e-8)

  def test_noise_mean_and_std(self):
    batch, c, z = 4, 0.7, 1.3
    grads = {"w": jnp.zeros((batch, 200_000)), "b": jnp.zeros((batch, 3))}
    params = one_example(grads)
    want_std = z * c / batch
    for tx in (oc.dp_aggregate(c, z, seed=3),
               optax.contrib.differentially_private_aggregate(
                   c, z, key=jax.random.key(3))):
      state = tx.init(params)
      update = jax.jit(tx.update)
      out1, state = update(grads, state)
      out2, state = update(grads, state)
      w = np.asarray(out1["w"], np.float64)
      # 200k samples: the mean is within 5 standard errors of 0 and the
      # sample standard deviation within 1% (about 3 of its standard errors).
      assert abs(w.mean()) < 5 * want_std / math.sqrt(w.size)
      np.testing.assert_allclose(w.std(), want_std, rtol=1e-2)
      # Every step draws fresh noise.
      assert np.corrcoef(w, np.asarray(out2["w"]))[0, 1] < 0.02
      if isinstance(state, oc.DPState):
        self.assertAlmostEqual(float(state.noise_std), z * c, places=6)

  def test_noise_added_to_the_clipped_sum(self):
    grads = per_example_tree()
    tx = oc.dp_aggregate(1.0, 0.5, seed=0, batch_size=10)
    out, state = tx.update(grads, tx.init(one_example(grads)))
    noiseless, _ = oc.dp_aggregate(1.0, 0.0, seed=0, batch_size=10).update(
        grads, tx.init(one_example(grads)))
    resid = np.concatenate([np.ravel(np.asarray(a) - np.asarray(b))
                            for a, b in zip(jax.tree.leaves(out),
                                            jax.tree.leaves(noiseless))])
    assert 0.01 < resid.std() < 0.1  # 0.5 * 1.0 / 10 = 0.05 on 38 samples.
    want, _, _, _ = ref.per_example_clip(leaves64(grads), 1.0)
    for got, w in zip(jax.tree.leaves(noiseless), want):
      np.testing.assert_allclose(got, w / 10, rtol=1e-5, atol=1e-8)

  def test_statistics_with_padding_and_nan(self):
    grads = per_example_tree(batch=8)
    grads = jax.tree.map(lambda x: x.at[1].set(jnp.nan), grads)
    mask = jnp.arange(8) != 6
    tx = optax.chain(oc.dp_aggregate(1.0, 0.0, seed=0), optax.sgd(1.0))
    params = one_example(grads)
    update = jax.jit(tx.update)
    out, state = update(grads, tx.init(params), params, example_mask=mask)
    s = state[0]
    keep = np.array([i not in (1, 6) for i in range(8)])
    want, norms, num_clipped, num_nonfinite = ref.per_example_clip(
        leaves64(grads), 1.0, mask=np.asarray(mask))
    for got, w in zip(jax.tree.leaves(out), want):
      np.testing.assert_allclose(got, -w / 8, rtol=1e-5, atol=1e-8)
    self.assertEqual(int(s.num_examples), 6)
    self.assertEqual(int(s.num_nonfinite), num_nonfinite)
    self.assertEqual(num_nonfinite, 1)
    self.assertAlmostEqual(float(s.frac_clipped), num_clipped / 6, places=6)
    np.testing.assert_allclose(s.mean_norm, norms[keep].mean(), rtol=1e-5)
    np.testing.assert_allclose(s.max_norm_seen, norms[keep].max(), rtol=1e-5)
    self.assertEqual(bool(s.clipped), num_clipped > 0)
    self.assertEqual(int(s.num_clipped), 1)
    self.assertEqual(int(s.count), 1)
    self.assertEqual(float(s.threshold), 1.0)
    self.assertIn(oc.DPState, _stats._REGISTRY)
    stats = oc.clip_stats(state)
    assert any(np.array_equal(v, s.max_norm_seen) for v in stats.values())

  def test_bfloat16(self):
    grads = per_example_tree(batch=8, dtype=jnp.bfloat16)
    tx = oc.dp_aggregate(1.0, 1.0, seed=0)
    out, state = tx.update(grads, tx.init(one_example(grads)))
    chex.assert_trees_all_equal_dtypes(out, one_example(grads))
    self.assertEqual(state.mean_norm.dtype, jnp.float32)
    self.assertTrue(all(np.all(np.isfinite(np.asarray(x, np.float32)))
                        for x in jax.tree.leaves(out)))

  def test_errors(self):
    with pytest.raises(ValueError, match="noise_multiplier"):
      oc.dp_aggregate(1.0, -1.0, seed=0)
    with pytest.raises(ValueError, match="max_norm"):
      oc.dp_aggregate(-1.0, 1.0, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
      oc.dp_aggregate(1.0, 1.0, seed=0, batch_size=0)
    with pytest.raises(TypeError, match="seed"):
      oc.dp_aggregate(1.0, 1.0, seed=None)


class DPNoiseTest(chex.TestCase):

  @pytest.mark.slow
  def test_clipped_grad_path_equals_dp_aggregate(self):
    loss, params, x, y = model_case("mlp", batch=12)
    mask = jnp.arange(12) < 10
    grad_fn = oc.clipped_grad(loss, max_norm=0.5, batch_argnums=(1, 2),
                              return_norms=True, microbatch_size=5)
    noise = optax.chain(oc.dp_noise(1.1, seed=7, batch_size=10),
                        optax.adam(1e-2))
    agg = optax.chain(oc.dp_aggregate(0.5, 1.1, seed=7, batch_size=10),
                      optax.adam(1e-2))

    @jax.jit
    def step_noise(params, state):
      g, info = grad_fn(params, x, y, example_mask=mask)
      u, state = noise.update(g, state, params, clip_info=info)
      return optax.apply_updates(params, u), state

    @jax.jit
    def step_agg(params, state):
      per_example = vmap_reference(loss, params, x, y)
      u, state = agg.update(per_example, state, params, example_mask=mask)
      return optax.apply_updates(params, u), state

    p1, s1 = params, noise.init(params)
    p2, s2 = params, agg.init(params)
    for _ in range(3):
      p1, s1 = step_noise(p1, s1)
      p2, s2 = step_agg(p2, s2)
    chex.assert_trees_all_close(p1, p2, rtol=1e-4, atol=1e-6)
    for field in ("frac_clipped", "mean_norm", "max_norm_seen", "noise_std",
                  "num_examples", "threshold", "count"):
      np.testing.assert_allclose(getattr(s1[0], field), getattr(s2[0], field),
                                 rtol=1e-5, err_msg=field)
    self.assertAlmostEqual(float(s1[0].noise_std), 1.1 * 0.5, places=6)

  @pytest.mark.slow
  def test_normalize_calibrates_noise_to_one(self):
    loss, params, x, y = model_case("mlp")
    g, info = oc.clipped_grad(loss, max_norm=0.5, batch_argnums=(1, 2),
                              normalize=True, return_norms=True)(params, x, y)
    tx = oc.dp_noise(2.0, seed=0)
    _, state = tx.update(g, tx.init(params), clip_info=info)
    self.assertEqual(float(state.noise_std), 2.0)

  @pytest.mark.slow
  def test_no_noise_and_no_clipping_is_the_plain_mean(self):
    loss, params, x, y = model_case("mlp")
    g, info = oc.clipped_grad(loss, max_norm=math.inf, batch_argnums=(1, 2),
                              return_norms=True)(params, x, y)
    tx = oc.dp_noise(0.0, seed=0)
    out, state = tx.update(g, tx.init(params), clip_info=info)
    chex.assert_trees_all_close(out, jax.grad(loss)(params, x, y), rtol=1e-5,
                                atol=1e-7)
    self.assertEqual(float(state.noise_std), 0.0)
    self.assertEqual(float(state.frac_clipped), 0.0)

  def test_automatic_clipping_noise_and_sum(self):
    # dp_aggregate (per-example gradients) with automatic clipping:
    # sum_i g_i C / (||g_i|| + gamma) over the batch size; dp_noise after it
    # adds noise of std z * C (z with normalize).
    grads = per_example_tree(batch=6, scale=2.0)
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(grads)]
    n = np.sqrt(sum(np.sum(x.reshape(6, -1) ** 2, axis=1) for x in leaves))
    want = [np.tensordot(0.5 / (n + 0.01), x, axes=1) / 6 for x in leaves]
    params = one_example(grads)
    agg = oc.dp_aggregate(0.5, 0.0, seed=0, automatic=0.01)
    out, _ = jax.jit(agg.update)(grads, agg.init(params))
    for g, w in zip(jax.tree.leaves(out), want):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
    tx = oc.dp_noise(2.0, seed=0)

    @jax.jit
    def noise_std(grads, state):
      stds = []
      for normalize in (False, True):
        total, info = oc.per_example_clip(grads, 0.5, automatic=0.01,
                                          normalize=normalize)
        stds.append(tx.update(total, state, clip_info=info)[1].noise_std)
      return stds

    np.testing.assert_allclose(noise_std(grads, tx.init(params)), [1.0, 2.0],
                               rtol=1e-6)

  def test_errors(self):
    tx = oc.dp_noise(1.0, seed=0)
    params = {"w": jnp.zeros(3)}
    with pytest.raises(TypeError, match="clip_info"):
      tx.update(params, tx.init(params))
    with pytest.raises(TypeError, match="quantile_norm"):
      oc.dp_noise(1.0, seed=0, max_norm=1.0)


class QuantileNormTest(chex.TestCase):

  def norm_batches(self, steps, batch=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.lognormal(1.0, 0.5, (steps, batch))

  def test_matches_reference_update(self):
    batches = self.norm_batches(30)
    tx = oc.dp_aggregate(oc.quantile_norm(1.0, 0.7, 0.3), 0.0, seed=0)
    state = tx.init({"w": jnp.zeros(1)})
    update = jax.jit(tx.update)
    got = []
    for norms in batches:
      _, state = update({"w": jnp.asarray(norms[:, None], jnp.float32)}, state)
      got.append(float(state.threshold))
    want = ref.quantile_norm_steps(batches, 1.0, 0.7, 0.3)
    np.testing.assert_allclose(got, want, rtol=1e-5)

  def test_converges_to_the_target_quantile(self):
    batches = self.norm_batches(300)
    for q in (0.3, 0.8):
      tx = oc.dp_aggregate(oc.quantile_norm(0.1, q, 0.2), 0.0, seed=0)
      state = tx.init({"w": jnp.zeros(1)})

      def body(state, norms, tx=tx):
        _, state = tx.update({"w": norms[:, None]}, state)
        return state, state.threshold

      _, thresholds = jax.jit(lambda s, b, body=body: jax.lax.scan(body, s, b))(
          state, jnp.asarray(batches, jnp.float32))
      # The population quantile of lognormal(1, 0.5).
      target = math.exp(1.0 + 0.5 * math.sqrt(2) * _erfinv(2 * q - 1))
      np.testing.assert_allclose(np.mean(thresholds[-100:]), target,
                                 rtol=0.1)

  def test_private_count_noise_and_budget_split(self):
    qn = oc.quantile_norm(1.0, 0.5, 0.0, count_noise_multiplier=5.0)
    tx = oc.dp_aggregate(qn, 1.0, seed=0)
    grads = {"w": jnp.ones((20, 1)) * 0.5}  # All unclipped.

    def body(state, _):
      _, state = tx.update(grads, state)
      return state, state.frac_unclipped

    state, fracs = jax.jit(lambda s: jax.lax.scan(body, s, None, length=400))(
        tx.init({"w": jnp.zeros(1)}))
    # The noised fraction: 1 + N(0, (5 / 20)^2).
    np.testing.assert_allclose(np.mean(fracs), 1.0, atol=0.05)
    np.testing.assert_allclose(np.std(fracs), 0.25, rtol=0.15)
    z = (1.0 - (2 * 5.0) ** -2) ** -0.5  # Andrew et al., Theorem 1.
    np.testing.assert_allclose(state.noise_std, z * 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="count_noise_multiplier"):
      tx = oc.dp_aggregate(oc.quantile_norm(1.0, count_noise_multiplier=0.4),
                           1.0, seed=0)
      tx.update(grads, tx.init({"w": jnp.zeros(1)}))

  def test_with_clipped_grad(self):
    loss, params, x, y = model_case("cnn", batch=16)
    grad_fn = oc.clipped_grad(loss, max_norm=1.0, batch_argnums=(1, 2),
                              return_norms=True)
    tx = oc.dp_noise(0.0, seed=0, max_norm=oc.quantile_norm(10.0, 0.5, 1.0))
    state = tx.init(params)
    per_example = vmap_reference(loss, params, x, y)
    _, norms, _, _ = ref.per_example_clip(leaves64(per_example), 1.0)

    @jax.jit
    def step(state):
      g, info = grad_fn(params, x, y, max_norm=state.next_threshold)
      return tx.update(g, state, clip_info=info)[1]

    for _ in range(60):
      state = step(state)
    # The same batch every step: the threshold settles at its median.
    assert np.sort(norms)[5] <= float(state.threshold) <= np.sort(norms)[10]

  def test_errors(self):
    with pytest.raises(ValueError, match="target_quantile"):
      oc.quantile_norm(1.0, 1.5)
    with pytest.raises(ValueError, match="initial"):
      oc.quantile_norm(0.0)


def _erfinv(y):
  """Inverse error function by bisection (no SciPy needed)."""
  lo, hi = -6.0, 6.0
  for _ in range(100):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if math.erf(mid) < y else (lo, mid)
  return (lo + hi) / 2


@pytest.mark.slow
def test_benchmark_runs_and_implementations_agree():
  """benchmarks/dp.py at a toy size: every implementation, same numbers."""
  from benchmarks import dp as bench
  rows = bench.measure("cnn", batch=8, microbatch=4, reps=1, warmup=0)
  names = {r["implementation"] for r in rows}
  assert "optaxclip.clipped_grad" in names
  assert all(r["ms"] > 0 and r["temp_bytes"] is not None for r in rows)
  rows += bench.measure("mlp", batch=8, microbatch=None, reps=1, warmup=0)
  assert "vmap + optax.per_example_global_norm_clip" in {
      r["implementation"] for r in rows}
  text = bench.markdown(rows, {"platform": "cpu", "device": "test",
                               "command": "test", "date": "today",
                               "versions": "", "reps": 1})
  assert text.count("\n| cnn | 8 | 4 |") == len(rows) - sum(
      r["model"] == "mlp" for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
def test_data_parallel_mesh_matches_one_device(axis_type):
  """Per-example inputs split over 8 devices: the same sums, noise and stats."""
  n = jax.device_count()
  if n < 2:
    pytest.skip("needs several devices (conftest gives 8 host devices)")
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P
  mesh = jax.make_mesh((n,), ("data",),
                       axis_types=(getattr(AxisType, axis_type),))
  split = NamedSharding(mesh, P("data"))
  grads = per_example_tree(batch=2 * n)
  mask = jnp.arange(2 * n) != 1
  tx = oc.dp_aggregate(1.0, 0.7, seed=0)
  params = one_example(grads)
  update = jax.jit(tx.update)
  want, want_state = update(grads, tx.init(params), example_mask=mask)
  got, state = update(jax.device_put(grads, split), tx.init(params),
                      example_mask=jax.device_put(mask, split))
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(state, want_state, rtol=1e-5)

  # An MLP: with a batch-sharded input, jax.vmap(jax.grad) itself gives other
  # per-example gradients for the small CNN of these tests (JAX 0.10.2, CPU).
  loss, p, x, y = model_case("mlp", batch=2 * n)
  grad_fn = jax.jit(oc.clipped_grad(loss, max_norm=0.5, batch_argnums=(1, 2),
                                    return_norms=True))
  noise = oc.dp_noise(1.0, seed=0)
  want, info = grad_fn(p, x, y)
  want_out, _ = noise.update(want, noise.init(p), clip_info=info)
  got, info = grad_fn(p, jax.device_put(x, split), jax.device_put(y, split))
  got_out, _ = noise.update(got, noise.init(p), clip_info=info)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(got_out, want_out, rtol=1e-5, atol=1e-6)
