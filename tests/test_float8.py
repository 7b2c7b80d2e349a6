"""float8 gradients (``float8_e4m3fn``, ``float8_e5m2``), alone and mixed
with wider dtypes, clipped with float32 accumulation.

The references are float64 NumPy: the norms of the float8 values (exact in
float64) and the scale rule ``min(1, t / n)``; the clipped values are those
factors applied in float32 and rounded to each leaf's dtype once, as
optaxclip does for float16. Every transform of a test runs in one ``jit``.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import optaxclip as oc
from tests import _references as ref

E4, E5 = jnp.float8_e4m3fn, jnp.float8_e5m2
DTYPES = {"e4": E4, "e5": E5, "f32": jnp.float32, "bf": jnp.bfloat16}
SHAPES = {"e4": (2, 3), "e5": (4,), "f32": (2,), "bf": (3,)}


def mixed(seed: int, scale: float = 1.0, dtypes=DTYPES):
  """A tree with a leaf of each dtype (values exact in each)."""
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(scale * rng.normal(size=SHAPES[k]), dtypes[k])
          for k in SHAPES}


def f64(tree):
  return {k: np.asarray(v).astype(np.float64) for k, v in tree.items()}


def scaled(g, factor):
  """``g * factor`` in float32, rounded to ``g``'s dtype once."""
  g = np.asarray(g)
  wide = g.astype(np.float32) * np.asarray(factor, np.float64).astype(
      np.float32)
  return wide.astype(g.dtype)


def assert_leaf(got, want, name):
  got, want = np.asarray(got), np.asarray(want)
  assert got.dtype == want.dtype, name
  if want.dtype == np.float32:
    np.testing.assert_allclose(got, want, rtol=2e-6, err_msg=name)
  else:  # One rounding to 3 (e4m3), 2 (e5m2) or 7 (bfloat16) bits: exact.
    np.testing.assert_array_equal(got.astype(np.float64),
                                  want.astype(np.float64), err_msg=name)


def test_global_norm_of_float8_trees_accumulates_in_float32():
  big = {"a": jnp.full((64,), 448.0, E4), "b": jnp.full((8,), 57344.0, E5)}
  got = oc.global_norm(big)
  assert got.dtype == jnp.float32
  want = np.sqrt(64 * 448.0**2 + 8 * 57344.0**2)
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  # Squared in float8 every entry would overflow (e4m3fn has no inf: NaN).
  assert not np.isfinite(float(jnp.sum(big["a"] * big["a"])))
  clip = oc.clip_by_global_norm(1.0)
  updates, state = clip.update(big, clip.init(big))
  assert float(state.stats.norm) == float(got)
  for k in big:
    assert_leaf(updates[k], scaled(big[k], 1.0 / want), k)


def _classic(grads, params, nan):
  txs = {
      "global": oc.clip_by_global_norm(1.0),
      "global_l1": oc.clip_by_global_norm(2.0, ord=1),
      "leaf": oc.clip_by_norm(0.5),
      "unit": oc.clip_by_norm(0.5, axis=0),
      "value": oc.clip_by_value(0.75),
      "agc": oc.adaptive_grad_clip(0.05, eps=1e-3),
      "taken": oc.skip_step(optax.identity(), skip_norm=100.0),
      "skipped": oc.skip_step(optax.identity(), skip_norm=0.5),
  }
  out = {k: tx.update(grads, tx.init(params), params)[0]
         for k, tx in txs.items()}
  nan_tx = oc.skip_step(optax.identity())
  out["nan_skipped"] = nan_tx.update(nan, nan_tx.init(nan))[0]
  out["nan_clipped"] = txs["global"].update(nan, txs["global"].init(nan))[0]
  return out


@pytest.mark.slow
def test_classic_clippers_on_mixed_float8_tree_match_float64_reference():
  grads, params = mixed(0, 2.0), mixed(1, 0.5)
  nan = {"e4": jnp.asarray([1.0, np.nan], E4), "e5": jnp.ones(2, E5)}
  out = jax.jit(_classic)(grads, params, nan)
  g, w = f64(grads), f64(params)

  def norm(x, ord=2):
    x = np.abs(np.asarray(x))
    return np.sum(x**ord) ** (1 / ord)

  def unit(x):  # AGC's units: a kernel's columns, a vector as a whole.
    return np.sqrt(np.sum(x**2, axis=0 if x.ndim == 2 else None,
                          keepdims=True))

  total = np.sqrt(sum(np.sum(v**2) for v in g.values()))
  total1 = sum(np.sum(np.abs(v)) for v in g.values())
  want = {
      "global": {k: scaled(grads[k], min(1, 1.0 / total)) for k in g},
      "global_l1": {k: scaled(grads[k], min(1, 2.0 / total1)) for k in g},
      "leaf": {k: scaled(grads[k], min(1, 0.5 / norm(g[k]))) for k in g},
      "unit": {k: scaled(grads[k], np.minimum(
          1, 0.5 / np.sqrt(np.sum(g[k]**2, axis=0, keepdims=True))))
               for k in g},
      "value": {k: np.clip(g[k], -0.75, 0.75).astype(np.asarray(grads[k]).dtype)
                for k in g},
      "agc": {k: scaled(grads[k], np.minimum(1, 0.05 * np.maximum(
          unit(w[k]), 1e-3) / unit(g[k]))) for k in g},
      "taken": {k: np.asarray(grads[k]) for k in g},
      "skipped": {k: np.zeros_like(np.asarray(grads[k])) for k in g},
  }
  assert total > 1 and all(norm(g[k]) > 0.5 for k in g)  # Every rule acts.
  for name, tree in want.items():
    for k in g:
      assert_leaf(out[name][k], tree[k], f"{name}/{k}")
  assert all(np.all(np.asarray(v).astype(np.float64) == 0)
             for v in out["nan_skipped"].values())
  assert all(np.isnan(np.asarray(v).astype(np.float64)).all()
             for v in out["nan_clipped"].values())


STEPS = 10
SPIKE = 7  # The step whose gradients are 40 times larger.


def _adaptive_txs():
  return {
      "quantile": oc.clip_by_quantile(0.5, window=4),
      "adagc": oc.adagc(1.05, decay=0.9, warmup_steps=3, max_norm=2.0),
      "spikes": oc.clip_spikes(4.0, decay=0.9),
  }


def _run_adaptive(grads):
  """Every adaptive clipper over the float8 steps, in one scan."""
  txs = _adaptive_txs()
  first = jax.tree.map(lambda x: x[0], grads)
  states = {k: tx.init(first) for k, tx in txs.items()}

  def step(states, g):
    out = {k: tx.update(g, states[k], g) for k, tx in txs.items()}
    return {k: v[1] for k, v in out.items()}, out

  return jax.lax.scan(step, states, grads)[1]


@pytest.mark.slow
def test_adaptive_clippers_on_float8_steps_match_float64():
  trees = [mixed(10 + t, 40.0 if t == SPIKE else 1.0) for t in range(STEPS)]
  out = jax.jit(_run_adaptive)(jax.tree.map(lambda *x: jnp.stack(x), *trees))
  keys = list(SHAPES)
  g = [f64(t) for t in trees]
  norms = np.array([np.sqrt(sum(np.sum(v**2) for v in s.values()))
                    for s in g])
  # The global rules: each step scaled by min(1, t / n), t the threshold the
  # rule chose (tested against the published rules in float32 by their own
  # test files), n the float64 norm of the float8 values.
  for name in ("quantile",):
    stats = out[name][1].stats
    np.testing.assert_allclose(stats.norm, norms, rtol=2e-6)
    factor = np.minimum(1, np.asarray(stats.threshold, np.float64) / norms)
    assert factor[SPIKE] < 0.5, name
    for t in range(STEPS):
      for k in keys:
        assert_leaf(out[name][0][k][t], scaled(trees[t][k], factor[t]),
                    f"{name}/{k}/{t}")
  thresholds = out["adagc"][1].leaf_thresholds
  for k in keys:
    # Warm-up (3 steps) holds the global norm to max_norm, then each tensor.
    n = np.array([np.sqrt(np.sum(s[k]**2)) for s in g])
    n[:3] = norms[:3]
    factor = np.minimum(1, np.asarray(thresholds[k], np.float64) / n)
    assert factor[SPIKE] < 0.5
    for t in range(STEPS):
      assert_leaf(out["adagc"][0][k][t], scaled(trees[t][k], factor[t]),
                  f"adagc/{k}/{t}")
  # SPAM's coordinate-wise rule in float64, each clipped value rounded to
  # its leaf's dtype (through float32) before it enters the moment, as the
  # optimizer after it sees it.
  for k in keys:
    dtype = np.asarray(trees[0][k]).dtype
    v = np.zeros(SHAPES[k])
    for t in range(STEPS):
      c, spiked = ref.spike_rule(g[t][k], v, 4.0)
      c = c.astype(np.float32).astype(dtype)
      assert_leaf(out["spikes"][0][k][t], c, f"spikes/{k}/{t}")
      assert t != SPIKE or spiked.any()
      v = 0.9 * v + 0.1 * c.astype(np.float64)**2


@pytest.mark.parametrize("dtype", [E4, E5], ids=["e4m3fn", "e5m2"])
def test_float8_casts_round_as_ml_dtypes(dtype):
  # The rounding the references use (NumPy's cast through ml_dtypes) is
  # XLA's: nearest, ties to even.
  x = np.linspace(-3.0, 3.0, 97).astype(np.float32)
  got = np.asarray(jax.jit(lambda v: v.astype(dtype))(x))
  np.testing.assert_array_equal(got.view(np.uint8),
                                x.astype(np.dtype(dtype)).view(np.uint8))
  assert np.dtype(dtype) in (np.dtype(ml_dtypes.float8_e4m3fn),
                             np.dtype(ml_dtypes.float8_e5m2))
