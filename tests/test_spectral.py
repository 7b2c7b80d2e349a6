"""clip_by_spectral_norm against the float64 SVD formula ``U min(s, t) V^T``."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import optaxclip as oc


def svd_clip(x, t, soft=False):
  """The published rules in float64: singular values ``min(s, t)``, or
  SPECTRA's soft ``s / sqrt(1 + s^2 / t^2)``, singular vectors kept."""
  u, s, vt = np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)
  s2 = s / np.sqrt(1 + (s / t) ** 2) if soft else np.minimum(s, t)
  return (u * s2[..., None, :]) @ vt


def spectral_norms(x):
  return np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)[..., 0]


def with_spectrum(rows, cols, values, seed):
  """A ``rows x cols`` float64 matrix with singular values ``values``."""
  rng = np.random.default_rng(seed)
  k = min(rows, cols)
  s = np.zeros(k)
  s[:len(values)] = values
  u, _ = np.linalg.qr(rng.normal(size=(rows, k)))
  v, _ = np.linalg.qr(rng.normal(size=(cols, k)))
  return (u * s) @ v.T


def spread(k, top, seed):
  """``k`` singular values: three above 1 (the largest ``top``, 10% above
  the next), the rest below 0.9, none within 10% of the threshold 1."""
  rng = np.random.default_rng(seed)
  return np.concatenate([[top], rng.uniform(1.2, top / 1.1, 2),
                         rng.uniform(0.0, 0.9, k - 3)])


@pytest.mark.slow
def test_matches_the_svd_formula_on_every_layout():
  g = {
      "square": with_spectrum(24, 24, spread(24, 20.0, 0), 1),
      "wide": with_spectrum(12, 40, spread(12, 8.0, 2), 3),
      "tall": with_spectrum(40, 12, spread(12, 50.0, 4), 5),
      "half": with_spectrum(24, 24, spread(24, 6.0, 6), 7),
      # Three layers of 12 x 40; the last one has nothing above 1.
      "stack": np.stack([with_spectrum(12, 40, spread(12, 5.0, 8), 9),
                         with_spectrum(12, 40, spread(12, 3.0, 10), 11),
                         with_spectrum(12, 40, [0.8, 0.5, 0.1], 12)]),
      "bias": np.arange(5.0),
      "skipped": np.eye(3) * 5.0,  # Left out by the mask.
  }
  grads = {k: jnp.asarray(v, jnp.bfloat16 if k == "half" else jnp.float32)
           for k, v in g.items()}
  clip = oc.clip_by_spectral_norm(1.0, leaf_norms=True, layer_axis={
      "square": None, "wide": None, "tall": None, "half": None, "stack": 0,
      "bias": None, "skipped": None},
      mask=lambda u: {k: k != "skipped" for k in u})
  out, state = jax.jit(clip.update)(grads, clip.init(grads))

  for k in ("square", "wide", "tall", "stack"):
    want = svd_clip(grads[k], 1.0)
    err = np.max(spectral_norms(np.asarray(out[k], np.float64) - want))
    assert out[k].dtype == jnp.float32
    assert err < 1e-5 * np.max(spectral_norms(g[k])), k
  # bfloat16 in, bfloat16 out: computed in float32, one rounding at the end.
  assert out["half"].dtype == jnp.bfloat16
  want = svd_clip(grads["half"], 1.0)
  assert np.linalg.norm(np.asarray(out["half"], np.float64) - want) < (
      2**-7 * np.linalg.norm(want))
  np.testing.assert_array_equal(out["bias"], grads["bias"])
  np.testing.assert_array_equal(out["skipped"], grads["skipped"])

  stats = state.stats
  before = {k: spectral_norms(grads[k]) for k in g
            if k not in ("bias", "skipped")}
  np.testing.assert_allclose(stats.norm, 50.0, rtol=1e-4)
  np.testing.assert_allclose(state.clipped_norm, 1.0, rtol=1e-4)
  assert stats.leaf_norms["bias"] is None
  assert stats.leaf_norms["stack"].shape == (3,)
  for k, v in before.items():
    np.testing.assert_allclose(stats.leaf_norms[k], v, rtol=1e-4)
    np.testing.assert_allclose(state.clipped_leaf_norms[k],
                               np.minimum(v, 1.0), rtol=1e-4)
  # Seven matrices, six above the threshold.
  np.testing.assert_allclose(stats.frac_clipped, 6 / 7)
  np.testing.assert_allclose(stats.scale, 1 / 50.0, rtol=1e-4)
  logged = oc.clip_stats(state, scalars=True)
  assert "clip_by_spectral_norm/leaf_norms/stack[2]" in logged
  assert not any("bias" in key or "skipped" in key for key in logged)


_ONE = jax.jit(lambda t, g: oc.clip_by_spectral_norm(t).update(
    g, oc.clip_by_spectral_norm(t).init(g))[0])


def test_edge_cases_inf_zero_threshold_zero_matrix_nan():
  rng = np.random.default_rng(0)
  g = np.stack([with_spectrum(8, 6, [30.0, 2.0, 0.5], 1),
                np.zeros((8, 6)),
                np.full((8, 6), 0.01),  # Frobenius norm below 1.
                rng.normal(size=(8, 6))])
  g[3, 2, 1] = np.nan
  g = jnp.asarray(g, jnp.float32)
  inf = _ONE(jnp.inf, g)
  np.testing.assert_array_equal(inf[:3], g[:3])  # Bit for bit.
  zero = _ONE(0.0, g)
  np.testing.assert_array_equal(zero[:3], 0.0)
  np.testing.assert_array_equal(_ONE(-1.0, g)[:3], 0.0)  # Acts as 0.
  one = _ONE(1.0, g)
  np.testing.assert_allclose(one[0], svd_clip(g[0], 1.0), atol=3e-5)
  np.testing.assert_array_equal(one[1:3], g[1:3])
  for out in (inf, zero, one):  # A NaN entry: the whole matrix is NaN.
    assert np.isnan(out[3]).all()


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), log_t=st.floats(-1.0, 1.0),
       log_top=st.floats(-1.5, 1.5))
def test_property_capped_and_singular_vectors_kept(seed, log_t, log_top):
  """Four 8 x 6 matrices, singular values drawn log-uniformly up to
  10^log_top * t: the largest after the clip is at most t (1 + 1e-4); in
  each input's singular basis the result is diagonal, its entries min(s,
  t) away from the threshold."""
  t = 10.0**log_t
  rng = np.random.default_rng(seed)
  s = t * 10.0 ** rng.uniform(-3, log_top, (4, 6))
  x = np.stack([with_spectrum(8, 6, v, seed + i) for i, v in enumerate(s)])
  y = np.asarray(_ONE(t, jnp.asarray(x, jnp.float32)), np.float64)
  assert np.all(spectral_norms(y) <= t * (1 + 1e-4))
  u, s, vt = np.linalg.svd(x, full_matrices=False)
  d = np.swapaxes(u, -1, -2) @ y @ np.swapaxes(vt, -1, -2)
  tol = 2e-5 * max(t, s.max())
  diag = np.diagonal(d, axis1=-2, axis2=-1)
  np.testing.assert_allclose(d - diag[..., None] * np.eye(6), 0.0, atol=tol)
  away = np.abs(s - t) > 0.05 * t
  np.testing.assert_allclose(diag[away], np.minimum(s, t)[away], atol=tol)


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="ns_steps"):
    oc.clip_by_spectral_norm(1.0, ns_steps=0)
  with pytest.raises(TypeError, match="soft"):
    oc.clip_by_spectral_norm(1.0, soft="yes")
  with pytest.raises(ValueError, match="max_norm"):
    oc.clip_by_spectral_norm(-1.0)
  with pytest.raises(TypeError, match="mask"):
    oc.clip_by_spectral_norm(1.0, mask={"w": 1})
  clip = oc.clip_by_spectral_norm(1.0, layer_axis=1)
  with pytest.raises(ValueError, match="last two axes"):
    clip.init({"w": jnp.zeros((3, 4, 5))})
  with pytest.raises(TypeError, match="complex"):
    oc.clip_by_spectral_norm(1.0).init(jnp.zeros((2, 2), jnp.complex64))


@pytest.mark.slow
def test_soft_clip_is_spectras_formula():
  x = with_spectrum(12, 20, spread(12, 30.0, 0), 1)
  clip = oc.clip_by_spectral_norm(2.0, soft=True)
  xj = jnp.asarray(x, jnp.float32)
  out, state = clip.update(xj, clip.init(xj))
  want = svd_clip(x, 2.0, soft=True)
  assert np.max(spectral_norms(np.asarray(out, np.float64) - want)) < 3e-5
  np.testing.assert_allclose(state.clipped_norm, spectral_norms(want),
                             rtol=1e-4)


def _svd_reference(t):
  """The clip as an optax transform built on JAX's SVD (LAPACK), not on
  Newton-Schulz: the chain's reference."""
  def clip(u, params=None):
    del params
    def one(x):
      if x.ndim < 2:
        return x
      a, s, b = jnp.linalg.svd(x, full_matrices=False)
      return (a * jnp.minimum(s, t)) @ b
    return jax.tree.map(one, u)
  return optax.stateless(clip)


@pytest.mark.slow
def test_chained_before_and_after_adamw_under_jit():
  """Before AdamW it clips the gradient; between Adam's direction and the
  learning rate, the update (SPECTRA's post-clip). Three jitted steps (a
  scan) match the same chains with an SVD-based clip."""
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(12, 8)), jnp.float32),
            "b": jnp.zeros(8)}
  grads = {"w": jnp.asarray(np.stack([
      with_spectrum(12, 8, spread(8, 9.0, i), i) for i in range(3)]),
      jnp.float32), "b": jnp.ones((3, 8))}

  def chains(clip_before, clip_after):
    return (optax.chain(clip_before, optax.adamw(1e-2, weight_decay=0.1)),
            optax.chain(optax.scale_by_adam(), clip_after,
                        optax.add_decayed_weights(0.1),
                        optax.scale_by_learning_rate(1e-2)))

  def run(txs):
    def one(tx):
      def step(carry, g):
        p, s = carry
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), None
      return jax.lax.scan(step, (params, tx.init(params)), grads)[0]
    return jax.jit(lambda: [one(tx) for tx in txs])()

  got = run(chains(oc.clip_by_spectral_norm(1.0),
                   oc.clip_by_spectral_norm(0.5)))
  want = run(chains(_svd_reference(1.0), _svd_reference(0.5)))
  for (p, state), (q, _) in zip(got, want):
    np.testing.assert_allclose(p["w"], q["w"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(p["b"], q["b"])
    assert int(oc.clip_stats(state)["clip_by_spectral_norm/count"]) == 3


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")
def test_sharded_jit_matches_the_svd_formula():
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("layers", "model"))
  g = {"stack": jnp.asarray(np.stack([
      with_spectrum(16, 24, spread(16, 10.0, i), i) for i in range(4)]),
      jnp.float32),
       "w": jnp.asarray(with_spectrum(32, 16, spread(16, 7.0, 9), 9),
                        jnp.float32)}
  specs = {"stack": P("layers", None, "model"), "w": P("model", None)}
  sharded = jax.device_put(g, {k: NamedSharding(mesh, s)
                               for k, s in specs.items()})
  clip = oc.clip_by_spectral_norm(1.0, layer_axis={"stack": 0, "w": None},
                                  leaf_norms=True)
  got, state = jax.jit(clip.update)(sharded, clip.init(g))
  for k in g:
    assert got[k].sharding.is_equivalent_to(sharded[k].sharding, g[k].ndim)
    np.testing.assert_allclose(got[k], svd_clip(g[k], 1.0), atol=2e-5)
  np.testing.assert_allclose(state.stats.leaf_norms["stack"],
                             spectral_norms(g["stack"]), rtol=1e-4)


@pytest.mark.slow
def test_nnx_stacked_layers_one_step():
  """Flax NNX: residual nnx.Linear layers stacked by nnx.vmap, trained by
  nnx.Optimizer with SGD (learning rate 1): each layer's kernel moves by
  its own gradient clipped by the SVD formula; biases by their gradient."""
  from flax import nnx

  class Stacked(nnx.Module):
    def __init__(self, rngs):
      @nnx.split_rngs(splits=3)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def create(rngs):
        return nnx.Linear(6, 6, rngs=rngs)
      self.layers = create(rngs)

    def __call__(self, x):
      w, b = self.layers.kernel.get_value(), self.layers.bias.get_value()
      for i in range(3):
        x = x + jnp.tanh(x @ w[i] + b[i])
      return x

  model = Stacked(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (32, 6)) * 10.0
  grads = nnx.jit(nnx.grad(lambda m: jnp.mean(m(x) ** 2)))(model)
  before = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model,
                                                             nnx.Param)))
  t = 1.0  # Singular values 0.14 to 15.5, none within 15% of it.
  layer_axis = nnx.State({"layers": 0})
  optimizer = nnx.Optimizer(model, optax.chain(oc.clip_by_spectral_norm(
      t, layer_axis=layer_axis, leaf_norms=True), optax.sgd(1.0)),
                            wrt=nnx.Param)
  nnx.jit(lambda m, o, g: o.update(m, g))(model, optimizer, grads)
  after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  g_kernel = np.asarray(grads["layers"]["kernel"].get_value())
  assert g_kernel.shape == (3, 6, 6) and np.all(spectral_norms(g_kernel) > t)
  moved = before["layers"]["kernel"] - np.asarray(after["layers"]["kernel"])
  np.testing.assert_allclose(moved, svd_clip(g_kernel, t), atol=5e-5)
  np.testing.assert_allclose(
      before["layers"]["bias"] - np.asarray(after["layers"]["bias"]),
      grads["layers"]["bias"].get_value(), rtol=1e-5, atol=1e-7)
  stats = oc.clip_stats(optimizer.opt_state, scalars=True)
  for i in range(3):
    np.testing.assert_allclose(
        stats[f"clip_by_spectral_norm/leaf_norms/layers/kernel[{i}]"],
        spectral_norms(g_kernel[i]), rtol=1e-4)


def test_far_above_the_threshold_the_top_lands_on_it():
  # tau = t / ||M||_F below 2^-10: tau^2 is lost beside G's eigenvalues in
  # float32; the clip is made at 2^-10 * ||M||_F and scaled down to t.
  w = with_spectrum(6, 4, [1.0, 0.8, 0.5, 0.1], seed=3)
  tx = oc.clip_by_spectral_norm(1.0)
  step = jax.jit(tx.update)
  for ratio in (1e2, 1e4, 1e8, 1e14, 1e30):
    g = {"w": jnp.asarray(w * ratio, jnp.float32)}
    out, state = step(g, tx.init(g))
    s = np.linalg.svd(np.asarray(out["w"], np.float64), compute_uv=False)
    assert np.all(np.isfinite(s)), ratio
    assert s[0] <= 1.0 + 1e-4 and s[0] >= 1.0 - 1e-4, (ratio, s)
    assert float(state.clipped_norm) == pytest.approx(1.0, rel=1e-4), ratio
    assert float(state.stats.norm) == pytest.approx(ratio, rel=1e-5), ratio
