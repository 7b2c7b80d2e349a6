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
from tests import _dp_references as ref
from tests._helpers import JIT, maybe_jit
from tests.test_per_example import leaves64, model_case, per_example_tree, vmap_reference


def one_example(grads):
  return jax.tree.map(lambda x: jnp.zeros(x.shape[1:], x.dtype), grads)


# ----------------------------------------------------------------------------
# dp_aggregate.


@pytest.mark.parametrize(**JIT)
@pytest.mark.slow
def test_matches_optax_without_noise(jitted):
  ours = optax.chain(oc.dp_aggregate(1.0, 0.0, key=0), optax.sgd(0.1))
  theirs = optax.chain(
      optax.contrib.differentially_private_aggregate(
          1.0, 0.0, key=jax.random.key(0)), optax.sgd(0.1))
  params = one_example(per_example_tree())
  s1, s2 = ours.init(params), theirs.init(params)
  update1, update2 = (maybe_jit(ours.update, jitted),
                      maybe_jit(theirs.update, jitted))
  for seed in range(3):
    grads = per_example_tree(seed=seed)
    u1, s1 = update1(grads, s1, params)
    u2, s2 = update2(grads, s2, params)
    chex.assert_trees_all_close(u1, u2, rtol=1e-6, atol=1e-8)
  want, _, _, _ = ref.per_example_clip(leaves64(grads), 1.0)
  for got, w in zip(jax.tree.leaves(u1), want):
    np.testing.assert_allclose(got, -0.1 * w / 6, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("ours", [True, False], ids=["optaxclip", "optax"])
def test_noise_mean_and_std(ours):
  batch, c, z = 4, 0.7, 1.3
  grads = {"w": jnp.zeros((batch, 200_000)), "b": jnp.zeros((batch, 3))}
  params = one_example(grads)
  want_std = z * c / batch
  tx = (oc.dp_aggregate(c, z, key=3) if ours else
        optax.contrib.differentially_private_aggregate(
            c, z, key=jax.random.key(3)))
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
  if ours:
    np.testing.assert_allclose(state.noise_std, z * c, rtol=1e-6)


def test_noise_added_to_the_clipped_sum():
  grads = per_example_tree()
  update = jax.jit(lambda tx, g, s: tx.update(g, s), static_argnums=0)
  tx = oc.dp_aggregate(1.0, 0.5, key=0, batch_size=10)
  state = tx.init(one_example(grads))
  out, _ = update(tx, grads, state)
  noiseless, _ = update(oc.dp_aggregate(1.0, 0.0, key=0, batch_size=10),
                        grads, state)
  resid = np.concatenate([np.ravel(np.asarray(a) - np.asarray(b))
                          for a, b in zip(jax.tree.leaves(out),
                                          jax.tree.leaves(noiseless))])
  assert 0.01 < resid.std() < 0.1  # 0.5 * 1.0 / 10 = 0.05 on 38 samples.
  want, _, _, _ = ref.per_example_clip(leaves64(grads), 1.0)
  for got, w in zip(jax.tree.leaves(noiseless), want):
    np.testing.assert_allclose(got, w / 10, rtol=1e-5, atol=1e-8)


def _seed_noise(total, seed, std, batch):
  """The first step's output as the key derived from an int ``seed`` gives
  it, written out: ``jax.random.PRNGKey(seed)``, split in three (next key,
  gradient noise, count noise), the gradient key split per leaf."""
  _, grad_key, _ = jax.random.split(jax.random.PRNGKey(seed), 3)
  leaves, treedef = jax.tree.flatten(total)
  keys = jax.random.split(grad_key, len(leaves))
  return jax.tree.unflatten(treedef, [
      (x + jax.random.normal(k, x.shape, x.dtype) * jnp.float32(std)) / batch
      for x, k in zip(leaves, keys)])


@jax.jit
def _first_step(key, grads):
  """The first outputs of dp_aggregate and of dp_noise (after
  per_example_clip) with ``key``: compiled once per kind of key."""
  params = one_example(grads)
  tx = oc.dp_aggregate(1.0, 0.7, key=key)
  state = tx.init(params)
  out, _ = tx.update(grads, state)
  total, info = oc.per_example_clip(grads, 1.0)
  noise = oc.dp_noise(0.7, key=key)
  got, _ = noise.update(total, noise.init(params), clip_info=info)
  return state.key, out, got, total


@pytest.mark.slow
def test_key_an_int_a_prng_key_and_a_typed_key_agree():
  """``key=n`` is ``jax.random.PRNGKey(n)``, bit for bit the noise that
  ``seed=n`` drew; a raw or typed key of the same data draws the same."""
  grads = per_example_tree()
  for seed in (0, 3):
    outs = []
    for key in (seed, np.int32(seed), jax.random.PRNGKey(seed),
                jax.random.key(seed)):
      state_key, out, got, total = _first_step(key, grads)
      assert state_key.dtype == jnp.uint32  # Raw key data, as PRNGKey's.
      outs.append((out, got))
    for out in outs[1:]:  # The same bits, whatever form the key takes.
      chex.assert_trees_all_equal(out, outs[0])
    want = _seed_noise(total, seed, 0.7, 6)
    for out in outs[0]:  # The same noise, up to the rounding of the sum.
      chex.assert_trees_all_close(out, want, rtol=1e-6, atol=1e-7)


def test_key_of_another_implementation_is_kept():
  key = jax.random.key(0, impl="rbg")
  tx = oc.dp_aggregate(1.0, 1.0, key=key)
  grads = per_example_tree()
  state = tx.init(one_example(grads))
  assert jax.random.key_impl(state.key) == jax.random.key_impl(key)
  out, state = tx.update(grads, state)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(out))


def test_statistics_with_padding_and_nan():
  grads = per_example_tree(batch=8)
  grads = jax.tree.map(lambda x: x.at[1].set(jnp.nan), grads)
  mask = jnp.arange(8) != 6
  tx = optax.chain(oc.dp_aggregate(1.0, 0.0, key=0), optax.sgd(1.0))
  params = one_example(grads)
  update = jax.jit(tx.update)
  out, state = update(grads, tx.init(params), params, example_mask=mask)
  s = state[0]
  keep = np.array([i not in (1, 6) for i in range(8)])
  want, norms, num_clipped, num_nonfinite = ref.per_example_clip(
      leaves64(grads), 1.0, mask=np.asarray(mask))
  for got, w in zip(jax.tree.leaves(out), want):
    np.testing.assert_allclose(got, -w / 8, rtol=1e-5, atol=1e-8)
  assert int(s.num_examples) == 6
  assert int(s.num_nonfinite) == num_nonfinite == 1
  np.testing.assert_allclose(s.stats.frac_clipped, num_clipped / 6,
                             rtol=1e-6)
  np.testing.assert_allclose(s.mean_norm, norms[keep].mean(), rtol=1e-5)
  np.testing.assert_allclose(s.largest_norm, norms[keep].max(), rtol=1e-5)
  assert bool(s.stats.clipped) == (num_clipped > 0)
  assert int(s.stats.num_clipped) == 1
  assert int(s.stats.count) == 1
  assert float(s.stats.threshold) == 1.0
  assert s.stats.norm is None and s.stats.scale is None
  stats = oc.clip_stats(state)
  for field in ("count", "threshold", "clipped", "num_clipped",
                "frac_clipped"):
    np.testing.assert_array_equal(stats[f"dp/{field}"],
                                  getattr(s.stats, field), err_msg=field)
  for field in ("next_threshold", "noise_std", "num_examples",
                "num_nonfinite", "mean_norm", "largest_norm",
                "frac_unclipped", "key"):
    np.testing.assert_array_equal(stats[f"dp/{field}"], getattr(s, field),
                                  err_msg=field)
  assert "dp/norm" not in stats and "dp/scale" not in stats
  scalars = oc.clip_stats(state, scalars=True)
  assert "dp/key" not in scalars
  assert float(scalars["dp/largest_norm"]) == float(s.largest_norm)


def test_state_before_the_first_step():
  tx = oc.dp_aggregate(0.5, 1.0, key=0)
  s = tx.init({"w": jnp.zeros(3)})
  assert int(s.stats.count) == 0 and int(s.stats.num_clipped) == 0
  assert not bool(s.stats.clipped) and float(s.stats.frac_clipped) == 0.0
  assert float(s.stats.threshold) == float(s.next_threshold) == 0.5
  assert np.isnan(oc.dp_noise(1.0, key=0).init({"w": jnp.zeros(3)})
                  .stats.threshold)
  adaptive = oc.dp_noise(1.0, key=0, adaptive_norm=oc.quantile_norm(2.0))
  assert float(adaptive.init({"w": jnp.zeros(3)}).next_threshold) == 2.0


def test_bfloat16():
  grads = per_example_tree(batch=8, dtype=jnp.bfloat16)
  tx = oc.dp_aggregate(1.0, 1.0, key=0)
  out, state = tx.update(grads, tx.init(one_example(grads)))
  chex.assert_trees_all_equal_dtypes(out, one_example(grads))
  assert state.mean_norm.dtype == jnp.float32
  assert all(np.all(np.isfinite(np.asarray(x, np.float32)))
             for x in jax.tree.leaves(out))


@pytest.mark.slow
def test_example_clip_rules():
  """An ExampleClip rule: the same as per_example_clip with it, also with
  an adaptive max_norm; the initial norm is checked."""
  grads = per_example_tree(scale=2.0)
  params = one_example(grads)
  rule = oc.ExampleClip(0.5, per_layer=True, normalize=True)
  tx = oc.dp_aggregate(rule, 0.0, key=0)
  out, state = jax.jit(tx.update)(grads, tx.init(params))
  want, info = oc.per_example_clip(grads, rule)
  chex.assert_trees_all_close(out, jax.tree.map(lambda x: x / 6, want),
                              rtol=1e-6, atol=1e-8)
  assert int(state.num_examples) == 6
  np.testing.assert_allclose(state.stats.frac_clipped,
                             int(info.num_examples_clipped) / 6, rtol=1e-6)
  adaptive = oc.dp_aggregate(
      oc.ExampleClip(oc.quantile_norm(0.5, target_quantile=0.5, learning_rate=0.0), per_layer=True,
                     normalize=True), 0.0, key=0)
  got, _ = jax.jit(adaptive.update)(grads, adaptive.init(params))
  chex.assert_trees_all_close(got, out, rtol=1e-6, atol=1e-8)
  with pytest.raises(ValueError, match="initial"):
    oc.dp_aggregate(oc.ExampleClip(oc.QuantileNorm(-1.0, 0.5, 0.2, 0.0)),
                    1.0, key=0)


@pytest.mark.parametrize("call, error, match", [
    (lambda: oc.dp_aggregate(1.0, -1.0, key=0), ValueError,
     "noise_multiplier"),
    (lambda: oc.dp_aggregate(-1.0, 1.0, key=0), ValueError, "max_norm"),
    (lambda: oc.dp_aggregate(1.0, 1.0, key=0, batch_size=0), ValueError,
     "batch_size"),
    (lambda: oc.dp_aggregate(1.0, 1.0, key=None), TypeError,
     r"dp_aggregate: key must be a JAX PRNG key"),
    (lambda: oc.dp_aggregate(1.0, 1.0, key=1.5), TypeError, "key"),
    (lambda: oc.dp_aggregate(1.0, 1.0, key=True), TypeError, "key"),
    (lambda: oc.dp_aggregate(1.0, 1.0, key=jnp.zeros(2, jnp.float32)),
     TypeError, "key"),
    (lambda: oc.dp_aggregate(1.0, 1.0), TypeError, "key"),
    (lambda: oc.dp_aggregate("1", 1.0, key=0), TypeError,
     "oc.quantile_norm"),
    (lambda: oc.dp_noise(1.0, key=None), TypeError,
     "dp_noise: key must be a JAX PRNG key"),
    (lambda: oc.dp_noise(1.0, key=0, adaptive_norm=1.0), TypeError,
     "quantile_norm"),
])
def test_errors(call, error, match):
  with pytest.raises(error, match=match):
    call()


@pytest.mark.parametrize("call, match", [
    (lambda: oc.dp_aggregate(1.0, 1.0, seed=0),
     r"dp_aggregate: seed= is now key= .*key=0 gives what seed=0 gave"),
    (lambda: oc.dp_aggregate(1.0, 1.0, key=0, per_layer=True),
     r"dp_aggregate: per_layer= moved into the rule: clip=oc\.ExampleClip"),
    (lambda: oc.dp_aggregate(1.0, 1.0, key=0, normalize=True),
     r"dp_aggregate: normalize= moved into the rule"),
    (lambda: oc.dp_aggregate(1.0, 1.0, key=0, automatic=0.01),
     r"dp_aggregate: automatic= moved into the rule"),
    (lambda: oc.dp_aggregate(1.0, 1.0, key=0, nan_safe=False),
     r"dp_aggregate: nan_safe= moved into the rule"),
    (lambda: oc.dp_aggregate(noise_multiplier=1.0, key=0, max_norm=1.0),
     r"dp_aggregate: max_norm= is now clip="),
    (lambda: oc.dp_noise(1.0, seed=0), r"dp_noise: seed= is now key="),
    (lambda: oc.dp_noise(1.0, key=0, max_norm=oc.quantile_norm()),
     r"dp_noise: max_norm= is now adaptive_norm="),
])
def test_old_keywords_name_their_replacement(call, match):
  with pytest.raises(TypeError, match=match):
    call()


# ----------------------------------------------------------------------------
# dp_noise.


@pytest.mark.slow
def test_clipped_grad_path_equals_dp_aggregate():
  loss, params, x, y = model_case("mlp", batch=12)
  mask = jnp.arange(12) < 10
  grad_fn = oc.clipped_grad(loss, clip=0.5, batch_argnums=(1, 2),
                            microbatch_size=5)
  noise = optax.chain(oc.dp_noise(1.1, key=7, batch_size=10),
                      optax.adam(1e-2))
  agg = optax.chain(oc.dp_aggregate(0.5, 1.1, key=7, batch_size=10),
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
  for field in ("frac_clipped", "threshold", "count"):
    np.testing.assert_allclose(getattr(s1[0].stats, field),
                               getattr(s2[0].stats, field), rtol=1e-5,
                               err_msg=field)
  for field in ("mean_norm", "largest_norm", "noise_std", "num_examples"):
    np.testing.assert_allclose(getattr(s1[0], field), getattr(s2[0], field),
                               rtol=1e-5, err_msg=field)
  np.testing.assert_allclose(s1[0].noise_std, 1.1 * 0.5, rtol=1e-6)


@pytest.mark.slow
def test_normalize_calibrates_noise_to_one():
  loss, params, x, y = model_case("mlp")
  g, info = oc.clipped_grad(loss, clip=oc.ExampleClip(0.5, normalize=True),
                            batch_argnums=(1, 2))(params, x, y)
  tx = oc.dp_noise(2.0, key=0)
  _, state = tx.update(g, tx.init(params), clip_info=info)
  assert float(state.noise_std) == 2.0


@pytest.mark.slow
def test_no_noise_and_no_clipping_is_the_plain_mean():
  loss, params, x, y = model_case("mlp")
  g, info = oc.clipped_grad(loss, clip=math.inf, batch_argnums=(1, 2))(
      params, x, y)
  tx = oc.dp_noise(0.0, key=0)
  out, state = tx.update(g, tx.init(params), clip_info=info)
  chex.assert_trees_all_close(out, jax.grad(loss)(params, x, y), rtol=1e-5,
                              atol=1e-7)
  assert float(state.noise_std) == 0.0
  assert float(state.stats.frac_clipped) == 0.0


def test_automatic_clipping_noise_and_sum():
  # dp_aggregate (per-example gradients) with automatic clipping:
  # sum_i g_i C / (||g_i|| + gamma) over the batch size; dp_noise after it
  # adds noise of std z * C (z with normalize).
  grads = per_example_tree(batch=6, scale=2.0)
  leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(grads)]
  n = np.sqrt(sum(np.sum(x.reshape(6, -1) ** 2, axis=1) for x in leaves))
  want = [np.tensordot(0.5 / (n + 0.01), x, axes=1) / 6 for x in leaves]
  params = one_example(grads)
  agg = oc.dp_aggregate(oc.ExampleClip(0.5, automatic=0.01), 0.0, key=0)
  out, _ = jax.jit(agg.update)(grads, agg.init(params))
  for g, w in zip(jax.tree.leaves(out), want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
  tx = oc.dp_noise(2.0, key=0)

  @jax.jit
  def noise_std(grads, state):
    stds = []
    for normalize in (False, True):
      total, info = oc.per_example_clip(
          grads, oc.ExampleClip(0.5, automatic=0.01, normalize=normalize))
      stds.append(tx.update(total, state, clip_info=info)[1].noise_std)
    return stds

  np.testing.assert_allclose(noise_std(grads, tx.init(params)), [1.0, 2.0],
                             rtol=1e-6)


def test_dp_noise_needs_clip_info():
  tx = oc.dp_noise(1.0, key=0)
  params = {"w": jnp.zeros(3)}
  with pytest.raises(TypeError, match="clip_info=.*grad_fn"):
    tx.update(params, tx.init(params))


# ----------------------------------------------------------------------------
# quantile_norm.


def norm_batches(steps, batch=64, seed=0):
  rng = np.random.default_rng(seed)
  return rng.lognormal(1.0, 0.5, (steps, batch))


def test_quantile_norm_matches_reference_update():
  batches = norm_batches(30)
  tx = oc.dp_aggregate(oc.quantile_norm(1.0, target_quantile=0.7, learning_rate=0.3), 0.0, key=0)

  def body(state, norms):
    _, state = tx.update({"w": norms[:, None]}, state)
    return state, state.stats.threshold

  _, got = jax.jit(lambda s, b: jax.lax.scan(body, s, b))(
      tx.init({"w": jnp.zeros(1)}), jnp.asarray(batches, jnp.float32))
  want = ref.quantile_norm_steps(batches, 1.0, 0.7, 0.3)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_quantile_norm_converges_to_the_target_quantile():
  """Both target quantiles in one compilation: the quantile is traced."""
  batches = jnp.asarray(norm_batches(300), jnp.float32)
  qs = (0.3, 0.8)

  @jax.jit
  @jax.vmap
  def run(q):
    tx = oc.dp_aggregate(oc.quantile_norm(0.1, target_quantile=q, learning_rate=0.2), 0.0, key=0)

    def body(state, norms):
      _, state = tx.update({"w": norms[:, None]}, state)
      return state, state.stats.threshold

    return jax.lax.scan(body, tx.init({"w": jnp.zeros(1)}), batches)[1]

  for q, thresholds in zip(qs, run(jnp.asarray(qs, jnp.float32))):
    # The population quantile of lognormal(1, 0.5).
    target = math.exp(1.0 + 0.5 * math.sqrt(2) * _erfinv(2 * q - 1))
    np.testing.assert_allclose(np.mean(thresholds[-100:]), target, rtol=0.1)


def test_quantile_norm_private_count_noise_and_budget_split():
  qn = oc.quantile_norm(1.0, target_quantile=0.5, learning_rate=0.0, count_noise_multiplier=5.0)
  tx = oc.dp_aggregate(qn, 1.0, key=0)
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
                         1.0, key=0)
    tx.update(grads, tx.init({"w": jnp.zeros(1)}))


@pytest.mark.slow
def test_quantile_norm_with_clipped_grad():
  loss, params, x, y = model_case("cnn", batch=16)
  grad_fn = oc.clipped_grad(loss, clip=1.0, batch_argnums=(1, 2))
  tx = oc.dp_noise(0.0, key=0,
                   adaptive_norm=oc.quantile_norm(10.0, target_quantile=0.5, learning_rate=1.0))
  per_example = vmap_reference(loss, params, x, y)
  _, norms, _, _ = ref.per_example_clip(leaves64(per_example), 1.0)

  def step(state, _):
    g, info = grad_fn(params, x, y, max_norm=state.next_threshold)
    return tx.update(g, state, clip_info=info)[1], None

  state, _ = jax.jit(lambda s: jax.lax.scan(step, s, None, length=60))(
      tx.init(params))
  # The same batch every step: the threshold settles at its median.
  assert np.sort(norms)[5] <= float(state.stats.threshold) <= np.sort(
      norms)[10]


@pytest.mark.parametrize("call, match", [
    (lambda: oc.quantile_norm(1.0, target_quantile=1.5), "target_quantile"),
    (lambda: oc.quantile_norm(0.0), "initial"),
])
def test_quantile_norm_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()


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
  tx = oc.dp_aggregate(1.0, 0.7, key=0)
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
  grad_fn = jax.jit(oc.clipped_grad(loss, clip=0.5, batch_argnums=(1, 2)))
  noise = oc.dp_noise(1.0, key=0)
  want, info = grad_fn(p, x, y)
  want_out, _ = noise.update(want, noise.init(p), clip_info=info)
  got, info = grad_fn(p, jax.device_put(x, split), jax.device_put(y, split))
  got_out, _ = noise.update(got, noise.init(p), clip_info=info)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(got_out, want_out, rtol=1e-5, atol=1e-6)
