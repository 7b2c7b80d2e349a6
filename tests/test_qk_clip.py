"""qk_clip: logits of nnx.MultiHeadAttention held at max_logit, the paper's
rule (Kimi K2's Algorithm 1) in float64 NumPy, stacked layers, jit and
meshes, edge cases and errors; grouped-query, latent (MLA) and fused qkv
attention layers against Megatron-LM's and Kimi K2's rules in float64."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optaxclip as oc

# nnx.capture (which the guide uses) is not in every supported Flax.
needs_capture = pytest.mark.skipif(not hasattr(nnx, "capture"),
                                   reason="this Flax has no nnx.capture")

HEADS, IN, QKV = 4, 8, 16
X = jax.random.normal(jax.random.key(1), (3, 5, IN))


def attention(seed=0, big=(0, 1), factor=6.0):
  """One nnx.MultiHeadAttention whose heads ``big`` have large logits, with
  nonzero biases so that their scaling is exercised."""
  attn = nnx.MultiHeadAttention(
      num_heads=HEADS, in_features=IN, qkv_features=QKV, decode=False,
      attention_fn=oc.max_logit_attention, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  for proj in (attn.query, attn.key):
    k = np.array(proj.kernel[...])
    k[:, list(big), :] *= factor
    proj.kernel[...] = jnp.asarray(k)
    proj.bias[...] = jnp.asarray(0.3 * rng.standard_normal((HEADS, QKV // HEADS)),
                                 jnp.float32)
  return attn


def logits_np(params, x):
  """Per-head max of q . k / sqrt(d) in float64, from the weights alone."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(x, np.float64)
  q = np.einsum("bsi,ihd->bshd", x, p["query"]["kernel"]) + p["query"]["bias"]
  k = np.einsum("bsi,ihd->bshd", x, p["key"]["kernel"]) + p["key"]["bias"]
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
  return s.max(axis=(0, 2, 3))


def recorded(model, x, **call):
  forward = nnx.capture(lambda m, x: m(x, sow_weights=True, **call),
                        nnx.Intermediate)
  _, inter = forward(model, x)
  return oc.gather_max_logits(inter)


def params_of(model):
  return nnx.as_pure(nnx.state(model, nnx.Param))


@nnx.jit
def train_step(model, optimizer, x):
  """The documented step: the logits are recorded by the loss's own pass."""
  def loss_fn(model):
    return jnp.mean(model(x, sow_weights=True) ** 2)
  grad_fn = nnx.value_and_grad(nnx.capture(loss_fn, nnx.Intermediate),
                               has_aux=True)
  (_, intermediates), grads = grad_fn(model)
  max_logits = oc.gather_max_logits(intermediates)
  optimizer.update(model, grads, max_logits=max_logits)
  return max_logits


# ----------------------------------------------------------------------------
# nnx.MultiHeadAttention, end to end.


@needs_capture
def test_recorded_logits_are_the_max_logits_of_the_weights():
  attn = attention()
  s = recorded(attn, X)
  assert list(s) == [""]
  np.testing.assert_allclose(s[""], logits_np(params_of(attn), X), rtol=1e-5)


@needs_capture
@pytest.mark.parametrize("inner", ["sgd", pytest.param("adamw", marks=pytest.mark.slow)])
def test_one_step_holds_the_clipped_heads_at_max_logit(inner):
  attn = attention()
  s = recorded(attn, X)[""]
  limit = float(np.sort(s)[1]) + 1.0  # Heads 0 and 1 (big) exceed limit.
  assert np.sum(s > limit) == 2 and s[0] > limit and s[1] > limit
  opt = (optax.sgd(1e-3) if inner == "sgd" else optax.adamw(1e-3))
  tx = optax.chain(opt, oc.qk_clip(limit))
  optimizer = nnx.Optimizer(attn, tx, wrt=nnx.Param)
  seen = train_step(attn, optimizer, X)
  np.testing.assert_allclose(seen[""], s, rtol=1e-6)
  unclipped = attention()  # The same step without the clip.
  train_step(unclipped, nnx.Optimizer(unclipped, optax.chain(opt),
                                      wrt=nnx.Param), X)
  after = logits_np(params_of(attn), X)
  free = logits_np(params_of(unclipped), X)
  gamma = np.minimum(1.0, limit / np.asarray(s, np.float64))
  # Bilinear: every logit of a clipped head shrinks by gamma exactly, so the
  # step's max logit (before the update's own small change) is the limit.
  np.testing.assert_allclose(after, gamma * free, rtol=2e-5)
  np.testing.assert_array_less(after[:2], limit * (1 + 2e-2))
  assert np.all(after[2:] == free[2:])  # Heads below the limit: bit for bit.
  stats = oc.clip_stats(optimizer.opt_state)
  assert int(stats["qk_clip/num_heads_clipped"]) == 2
  np.testing.assert_allclose(stats["qk_clip/largest_logit"], s.max())
  np.testing.assert_allclose(stats["qk_clip/scale"], gamma.min(), rtol=1e-6)
  np.testing.assert_allclose(stats["qk_clip/threshold"], limit)
  np.testing.assert_allclose(stats["qk_clip/frac_clipped"], 2 / HEADS)
  assert bool(stats["qk_clip/clipped"]) and "qk_clip/norm" not in stats


@needs_capture
def test_without_an_update_the_largest_logit_lands_on_max_logit():
  attn = attention()
  s = recorded(attn, X)[""]
  limit = 0.5 * float(s.min())
  params = params_of(attn)
  tx = oc.qk_clip(limit)
  zero = jax.tree.map(jnp.zeros_like, params)
  u, _ = tx.update(zero, tx.init(params), params, max_logits={"": s})
  nnx.update(attn, optax.apply_updates(params, u))
  np.testing.assert_allclose(logits_np(params_of(attn), X), limit, rtol=1e-5)
  np.testing.assert_allclose(recorded(attn, X)[""], limit, rtol=1e-5)


@needs_capture
@pytest.mark.slow
def test_stacked_layers_scanned():
  layers = 3

  class Stack(nnx.Module):
    def __init__(self, rngs):
      @nnx.split_rngs(splits=layers)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make(rngs):
        return nnx.MultiHeadAttention(
            num_heads=HEADS, in_features=IN, qkv_features=QKV, decode=False,
            attention_fn=oc.max_logit_attention, rngs=rngs)
      self.layers = make(rngs)

    def __call__(self, x, sow_weights=False):
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def body(x, layer):
        return layer(x, sow_weights=sow_weights)
      return body(x, self.layers)

  model = Stack(nnx.Rngs(0))
  s = recorded(model, X)
  assert list(s) == ["layers"] and s["layers"].shape == (layers, HEADS)
  params = params_of(model)
  limit = float(np.median(s["layers"]))
  tx = oc.qk_clip(limit, query_exponent=0.3)
  zero = jax.tree.map(jnp.zeros_like, params)
  u, state = tx.update(zero, tx.init(params), params, max_logits=s)
  new = optax.apply_updates(params, u)
  # Layer 0 sees X: its recorded logits are those of its weights.
  first = jax.tree.map(lambda a: a[0], params["layers"])
  np.testing.assert_allclose(logits_np(first, X), s["layers"][0], rtol=1e-5)
  np.testing.assert_allclose(
      logits_np(jax.tree.map(lambda a: a[0], new["layers"]), X),
      np.minimum(s["layers"][0], limit), rtol=1e-5)
  want = reference(params["layers"], zero["layers"], np.asarray(s["layers"]),
                   limit, 0.3, lead=1)
  for part in ("query", "key"):
    for name in ("kernel", "bias"):
      np.testing.assert_allclose(new["layers"][part][name], want[part][name],
                                 rtol=1e-5, atol=1e-7)
  assert int(state.num_heads_clipped) == int(np.sum(s["layers"] > limit))


# ----------------------------------------------------------------------------
# The rule, against a float64 NumPy transcription of Algorithm 1.


def reference(w, u, s, tau, alpha, lead=0):
  """New query and key weights: W + u, then each head h with S[h] > tau
  times (tau / S[h]) ** alpha (query) or ** (1 - alpha) (key): Kimi K2's
  symbols, tau the max_logit, alpha the query_exponent."""
  out = {}
  for part, power in (("query", alpha), ("key", 1 - alpha)):
    new = {}
    for name in ("kernel", "bias"):
      x = np.asarray(w[part][name], np.float64) + np.asarray(
          u[part][name], np.float64)
      x = np.moveaxis(x, -2, lead)  # Heads next to the layer axes.
      for idx in np.ndindex(*np.shape(s)):
        if s[idx] > tau:
          x[idx] = x[idx] * (tau / s[idx]) ** power
      new[name] = np.moveaxis(x, lead, -2)
    out[part] = new
  return out


def random_attention(rng, lead=()):
  def proj():
    return {"kernel": rng.standard_normal((*lead, IN, HEADS, 2)),
            "bias": rng.standard_normal((*lead, HEADS, 2))}
  return {"query": proj(), "key": proj(), "value": proj()}


@jax.jit
def _rule(u, w, s, query_exponent):
  """One step of qk_clip(100, query_exponent=...), the exponent traced: one
  compilation per tree structure."""
  tx = oc.qk_clip(100.0, query_exponent=query_exponent)
  return tx.update(u, tx.init(w), w, max_logits=s)[0]


@settings(max_examples=12, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([0.0, 0.3, 0.5, 1.0]),
       st.booleans())
def test_the_rule_matches_numpy(seed, query_exponent, stacked):
  rng = np.random.default_rng(seed)
  lead = (2,) if stacked else ()
  w = random_attention(rng, lead)
  u = jax.tree.map(lambda a: 0.1 * a, random_attention(rng, lead))
  s = rng.choice([0.0, -3.0, 50.0, 150.0, 1e4, 100.0], size=(*lead, HEADS))
  wj, uj = (jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)
            for t in (w, u))
  out = _rule(uj, wj, jnp.asarray(s, jnp.float32), jnp.float32(query_exponent))
  new = optax.apply_updates(wj, out)
  want = reference(w, u, s, 100.0, query_exponent, lead=len(lead))
  for part in ("query", "key"):
    for name in ("kernel", "bias"):
      np.testing.assert_allclose(new[part][name], want[part][name],
                                 rtol=1e-5, atol=1e-6)
  # Leaves of no attention module and unclipped heads: u bit for bit.
  np.testing.assert_array_equal(out["value"]["kernel"], uj["value"]["kernel"])
  below = np.moveaxis(np.asarray(out["query"]["kernel"]), -2, len(lead))[s <= 100]
  np.testing.assert_array_equal(
      below, np.moveaxis(np.asarray(uj["query"]["kernel"]), -2, len(lead))[s <= 100])


def test_layouts_by_module_path():
  rng = np.random.default_rng(0)
  params = {"enc": {"q": {"w": jnp.ones((IN, HEADS))},
                    "k": {"w": jnp.ones((IN, HEADS))}},
            "dec": random_attention(rng)}
  params = jax.tree.map(jnp.asarray, params)
  tx = oc.qk_clip(1.0, layout={"enc": oc.QKLayout("q", "k", head_axis=-1)})
  s = {"enc": jnp.array([4.0, 1.0, 1.0, 1.0]), "dec": jnp.zeros(HEADS)}
  zero = jax.tree.map(jnp.zeros_like, params)
  u, _ = tx.update(zero, tx.init(params), params, max_logits=s)
  new = optax.apply_updates(params, u)
  np.testing.assert_allclose(new["enc"]["q"]["w"][0], [0.5, 1, 1, 1])
  np.testing.assert_allclose(new["enc"]["k"]["w"][0], [0.5, 1, 1, 1])


def test_bfloat16_weights():
  rng = np.random.default_rng(0)
  w = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), random_attention(rng))
  tx = oc.qk_clip(100.0)
  zero = jax.tree.map(jnp.zeros_like, w)
  s = jnp.array([400.0, 1.0, 1.0, 1.0], jnp.bfloat16)
  u, state = tx.update(zero, tx.init(w), w, max_logits=s)
  assert u["query"]["kernel"].dtype == jnp.bfloat16
  new = optax.apply_updates(w, u)
  np.testing.assert_allclose(
      np.asarray(new["query"]["kernel"][:, 0], np.float32),
      0.5 * np.asarray(w["query"]["kernel"][:, 0], np.float32), rtol=1e-2)
  assert state.largest_logit.dtype == jnp.float32
  assert state.stats.scale.dtype == jnp.float32


# ----------------------------------------------------------------------------
# Edge cases.


W = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32),
                random_attention(np.random.default_rng(0)))
U = jax.tree.map(lambda a: 0.01 * a, W)


@jax.jit
def one_step(s, max_logit=100.0):
  """One step on U, W with ``max_logit`` traced: a value arriving at run
  time, and one compilation for every value."""
  tx = oc.qk_clip(max_logit)
  return tx.update(U, tx.init(W), W, max_logits=jnp.asarray(s, jnp.float32))


@pytest.mark.parametrize("s", [
    [0.0, -5.0, -np.inf, 100.0], [np.nan, np.inf, 1.0, 2.0]])
def test_heads_not_over_the_limit_or_not_finite_are_untouched(s):
  out, state = one_step(s)
  jax.tree.map(np.testing.assert_array_equal, out, U)
  assert not bool(state.stats.clipped) and int(state.num_heads_clipped) == 0
  assert float(state.stats.scale) == 1.0
  assert float(state.stats.frac_clipped) == 0.0
  assert int(state.num_nonfinite) == int(np.sum(np.isnan(s) | (np.asarray(s) == np.inf)))
  assert float(state.largest_logit) == np.nanmax(s)


def test_nan_next_to_a_clipped_head():
  out, state = one_step([np.nan, 400.0, 1.0, 1.0])
  assert int(state.num_nonfinite) == 1 and int(state.num_heads_clipped) == 1
  assert float(state.largest_logit) == 400.0
  assert float(state.stats.frac_clipped) == 0.25
  np.testing.assert_allclose(float(state.stats.scale), 0.25)
  assert int(state.stats.num_clipped) == 1 and int(state.stats.count) == 1
  assert np.all(np.isfinite(out["query"]["kernel"]))


@pytest.mark.parametrize("max_logit", [math.inf, 0.0, -1.0, math.nan])
def test_infinite_or_run_time_max_logit_that_is_not_positive(max_logit):
  out, state = one_step([1e30, 400.0, 1.0, 1.0], max_logit)
  jax.tree.map(np.testing.assert_array_equal, out, U)
  assert float(state.stats.threshold) == math.inf


def test_schedule_max_logit_that_is_not_positive():
  tx = oc.qk_clip(lambda n: -1.0)
  out, state = tx.update(U, tx.init(W), W,
                         max_logits=jnp.array([1e30, 400.0, 1.0, 1.0]))
  jax.tree.map(np.testing.assert_array_equal, out, U)
  assert float(state.stats.threshold) == math.inf


def test_jit_and_a_schedule():
  rng = np.random.default_rng(0)
  w = jax.tree.map(jnp.asarray, random_attention(rng))
  tx = oc.qk_clip(optax.constant_schedule(100.0))
  s = jnp.array([400.0, 1.0, 1.0, 1.0])
  eager = tx.update(w, tx.init(w), w, max_logits=s)
  jitted = jax.jit(tx.update)(w, tx.init(w), w, max_logits=s)
  jax.tree.map(np.testing.assert_array_equal, eager, jitted)
  injected = optax.inject_hyperparams(oc.qk_clip)(max_logit=100.0,
                                                   query_exponent=0.5)
  got = jax.jit(injected.update)(w, injected.init(w), w, max_logits=s)
  jax.tree.map(np.testing.assert_array_equal, got[0], eager[0])


def test_sharded_jit_matches_one_device():
  rng = np.random.default_rng(0)
  w = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), random_attention(rng))
  u = jax.tree.map(lambda a: 0.01 * a, w)
  s = jnp.array([400.0, 1.0, 150.0, 1.0])
  tx = optax.chain(optax.sgd(0.1), oc.qk_clip(100.0))
  want = jax.jit(tx.update)(u, tx.init(w), w, max_logits=s)
  mesh = jax.make_mesh((len(jax.devices()),), ("d",))

  def put(x):  # Kernels split along in_features, biases replicated.
    spec = P("d") if x.ndim == 3 else P()
    return jax.device_put(x, NamedSharding(mesh, spec))

  ws, us = jax.tree.map(put, w), jax.tree.map(put, u)
  got = jax.jit(tx.update)(us, tx.init(ws), ws, max_logits=s)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               got, want)
  assert got[0]["query"]["kernel"].sharding.spec[0] == "d"


def test_shard_map_reduces_each_devices_logits():
  # Data parallel: each device saw its own examples' logits; with axis_name
  # every device clips by the batch's largest, as one device would.
  rng = np.random.default_rng(1)
  w = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), random_attention(rng))
  u = jax.tree.map(lambda a: 0.01 * a, w)
  n = len(jax.devices())
  local = jnp.asarray(rng.uniform(0.0, 300.0, (n, 4)), jnp.float32)
  local = local.at[n - 1, 0].set(500.0)  # One device saw the largest logit.
  tx = oc.qk_clip(100.0)
  want, want_state = tx.update(u, tx.init(w), w, max_logits=local.max(0))
  mesh = jax.make_mesh((n,), ("data",))
  sharded = oc.qk_clip(100.0, axis_name="data")

  @jax.jit
  @jax.shard_map(mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=P())
  def step(u, w, s):
    return sharded.update(u, sharded.init(w), w, max_logits=s[0])

  def put(x, spec):
    return jax.device_put(x, NamedSharding(mesh, spec))

  got, state = step(jax.tree.map(lambda x: put(x, P()), u),
                    jax.tree.map(lambda x: put(x, P()), w),
                    put(local, P("data")))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               got, want)
  assert float(state.largest_logit) == 500.0 == float(
      want_state.largest_logit)
  assert int(state.num_heads_clipped) == int(want_state.num_heads_clipped)


def test_chain_forwards_other_extra_args():
  rng = np.random.default_rng(0)
  w = jax.tree.map(jnp.asarray, random_attention(rng))
  tx = optax.chain(optax.sgd(0.1), oc.qk_clip(100.0))
  tx.update(w, tx.init(w), w, max_logits=jnp.ones(HEADS), loss=jnp.ones(()))
  guarded = oc.skip_step(tx)  # skip_step passes the extra arguments on.
  s = jnp.array([400.0, 1.0, 1.0, 1.0])
  u, state = guarded.update(w, guarded.init(w), w, max_logits=s)
  stats = oc.clip_stats(state)
  assert int(stats["qk_clip/num_heads_clipped"]) == 1
  assert not bool(stats["skip_step/skipped"])


# ----------------------------------------------------------------------------
# Errors.


def test_missing_max_logits_or_params():
  w = jax.tree.map(jnp.asarray, random_attention(np.random.default_rng(0)))
  tx = optax.chain(optax.sgd(0.1), oc.qk_clip())
  with pytest.raises(ValueError, match="max_logits=.*max_logit_attention"):
    tx.update(w, tx.init(w), w)
  with pytest.raises(ValueError, match="needs params"):
    oc.qk_clip().update(w, None, max_logits=jnp.ones(HEADS))
  with pytest.raises(ValueError, match="no array"):
    oc.qk_clip().update(w, oc.qk_clip().init(w), w, max_logits={})


@pytest.mark.parametrize("s, match", [
    ({"attn": jnp.ones(HEADS)}, "attn/query"),
    (jnp.ones(HEADS + 1), "5 heads"),
    (jnp.ones((2, HEADS)), "layer axes"),
    (jnp.ones(HEADS, jnp.int32), "float"),
])
def test_max_logits_that_do_not_fit(s, match):
  w = jax.tree.map(jnp.asarray, random_attention(np.random.default_rng(0)))
  tx = oc.qk_clip()
  with pytest.raises((ValueError, TypeError), match=match):
    tx.update(w, tx.init(w), w, max_logits=s)


@pytest.mark.parametrize("build, error, match", [
    (lambda: oc.qk_clip(layout={"attn": ("q", "k")}), TypeError, "layout"),
    (lambda: oc.qk_clip(layout=oc.QKLayout(head_axis="-2")), TypeError,
     "head_axis"),
    (lambda: oc.qk_clip(0.0), ValueError, "max_logit=0.0 must be > 0"),
    (lambda: oc.qk_clip(-1.0), ValueError, "max_logit"),
    (lambda: oc.qk_clip(query_exponent=1.5), ValueError, "query_exponent"),
    (lambda: oc.qk_clip(layout=oc.QKLayout(kv_heads=0)), ValueError,
     "kv_heads=0 must be None or a positive int"),
    (lambda: oc.qk_clip(layout=oc.QKLayout(nope_dim=2.5)), ValueError,
     "nope_dim"),
    (lambda: oc.qk_clip(layout=oc.QKLayout(fused="kqv")), ValueError,
     "fused='kqv' must be None, 'qkv'.*or 'grouped'"),
    (lambda: oc.qk_clip(layout=oc.QKLayout(fused="qkv", nope_dim=2)),
     ValueError, "both fused and nope_dim"),
    (lambda: oc.qk_clip("big"), TypeError, "max_logit"),
    # Keywords of earlier releases name their replacement.
    (lambda: oc.qk_clip(tau=50.0), TypeError, "tau= is now max_logit="),
    (lambda: oc.qk_clip(alpha=0.3), TypeError,
     "alpha= is now query_exponent="),
])
def test_bad_arguments_name_the_argument(build, error, match):
  with pytest.raises(error, match=match):
    build()


@needs_capture
def test_attention_without_sow_weights_records_nothing():
  attn = attention()
  plain = nnx.MultiHeadAttention(
      num_heads=HEADS, in_features=IN, qkv_features=QKV, decode=False,
      rngs=nnx.Rngs(0))
  nnx.update(plain, nnx.state(attn, nnx.Param))
  np.testing.assert_allclose(attn(X), plain(X), rtol=1e-5, atol=1e-6)
  _, inter = nnx.capture(lambda m: m(X), nnx.Intermediate)(attn)
  with pytest.raises(ValueError, match="no max logits.*sow_weights=True"):
    oc.gather_max_logits(inter)


@needs_capture
def test_masked_positions_are_left_out():
  attn = attention()
  causal = recorded(attn, X, mask=nnx.make_causal_mask(X[..., 0]))[""]
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params_of(attn))
  x = np.asarray(X, np.float64)
  q = np.einsum("bsi,ihd->bshd", x, p["query"]["kernel"]) + p["query"]["bias"]
  k = np.einsum("bsi,ihd->bshd", x, p["key"]["kernel"]) + p["key"]["bias"]
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
  s = np.where(np.tril(np.ones((5, 5), bool)), s, -np.inf)
  np.testing.assert_allclose(causal, s.max(axis=(0, 2, 3)), rtol=1e-5)


@pytest.mark.slow
def test_state_round_trips_through_orbax(tmp_path):
  import orbax.checkpoint as ocp
  rng = np.random.default_rng(2)
  w = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), random_attention(rng))
  tx = oc.qk_clip(100.0)
  _, state = tx.update(w, tx.init(w), w,
                       max_logits=jnp.array([400.0, 1.0, jnp.nan, 150.0]))
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "ckpt", state)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tx.init(w))
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(tmp_path / "ckpt", abstract)
  assert type(restored) is oc.QKClipState
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  assert int(restored.num_heads_clipped) == 2 and int(restored.num_nonfinite) == 1


# ----------------------------------------------------------------------------
# Grouped-query, latent (MLA) and fused qkv attention: small Flax NNX layers,
# their logits in float64 NumPy, and the published rules transcribed.

KV, D = 2, 4          # GQA: 4 query heads share 2 key heads (groups of 2).
G = HEADS // KV
NOPE, ROPE, RANK = 4, 2, 6  # MLA: per-head part, rotary part, latent width.
VDIM = NOPE + ROPE    # MLA value width (jax.nn's attention wants qk's).


def _attend(module, q, k, v, sow_weights):
  """The attention, its max logits sown on ``module`` (with
  ``sow_weights``), through ``module.out``."""
  out = oc.max_logit_attention(q, k, v, module=module if sow_weights else None)
  return module.out(out.reshape(*out.shape[:-2], -1))



class GQA(nnx.Module):
  """Separate projections, 2 key heads for 4 query heads."""

  def __init__(self, rngs):
    self.query = nnx.LinearGeneral(IN, (HEADS, D), rngs=rngs)
    self.key = nnx.LinearGeneral(IN, (KV, D), rngs=rngs)
    self.value = nnx.LinearGeneral(IN, (KV, D), rngs=rngs)
    self.out = nnx.Linear(HEADS * D, IN, rngs=rngs)

  def __call__(self, x, sow_weights=False):
    return _attend(self, self.query(x), self.key(x), self.value(x),
                   sow_weights)


def _rope(x, xp):
  """Rotary embedding of the last axis (pairs), positions on axis 1."""
  pos = xp.arange(x.shape[1]).reshape(1, -1, *[1] * (x.ndim - 2))
  angle = pos * xp.asarray([1.0, 0.1])[: x.shape[-1] // 2]
  c, s = xp.cos(angle), xp.sin(angle)
  a, b = x[..., 0::2], x[..., 1::2]
  return xp.stack([a * c - b * s, a * s + b * c], axis=-1).reshape(x.shape)


class MLA(nnx.Module):
  """Multi-head latent attention as in DeepSeek-V2 and Kimi K2: queries
  through a low-rank pair, keys and values up-projected from a normed
  latent, one rotary key shared by the heads."""

  def __init__(self, rngs):
    self.wq_a = nnx.Linear(IN, RANK, use_bias=False, rngs=rngs)
    self.wq_b = nnx.LinearGeneral(RANK, (HEADS, NOPE + ROPE), rngs=rngs)
    self.wkv_a = nnx.Linear(IN, RANK + ROPE, use_bias=False, rngs=rngs)
    self.kv_norm = nnx.RMSNorm(RANK, rngs=rngs)
    self.wkv_b = nnx.LinearGeneral(RANK, (HEADS, NOPE + VDIM), rngs=rngs)
    self.out = nnx.Linear(HEADS * VDIM, IN, rngs=rngs)

  def __call__(self, x, sow_weights=False):
    q = self.wq_b(self.wq_a(x))
    kv = self.wkv_a(x)
    kv_b = self.wkv_b(self.kv_norm(kv[..., :RANK]))
    k_rope = _rope(kv[..., None, RANK:], jnp)
    q = jnp.concatenate([q[..., :NOPE], _rope(q[..., NOPE:], jnp)], -1)
    k = jnp.concatenate([kv_b[..., :NOPE], jnp.broadcast_to(
        k_rope, (*k_rope.shape[:-2], HEADS, ROPE))], -1)
    return _attend(self, q, k, kv_b[..., NOPE:], sow_weights)


class Fused(nnx.Module):
  """One qkv projection, 2 key heads for 4 query heads: flat ``[q | k | v]``
  outputs (``"qkv"``) or ``(key heads, group + 2, head_dim)`` (Megatron's
  ``"grouped"``)."""

  def __init__(self, rngs, order):
    self.order = order
    shape = (KV, G + 2, D) if order == "grouped" else ((HEADS + 2 * KV) * D,)
    self.qkv = nnx.LinearGeneral(IN, shape, rngs=rngs)
    self.out = nnx.Linear(HEADS * D, IN, rngs=rngs)

  def __call__(self, x, sow_weights=False):
    return _attend(self, *split_qkv(self.qkv(x), self.order), sow_weights)


def split_qkv(y, order):
  """``(q, k, v)`` heads of a fused projection's outputs (any array type)."""
  lead = y.shape[:2]
  y = y.reshape(*lead, -1)
  if order == "qkv":
    q, k, v = (y[..., :HEADS * D], y[..., HEADS * D:(HEADS + KV) * D],
               y[..., (HEADS + KV) * D:])
    return (q.reshape(*lead, HEADS, D), k.reshape(*lead, KV, D),
            v.reshape(*lead, KV, D))
  y = y.reshape(*lead, KV, G + 2, D)
  return y[..., :G, :].reshape(*lead, HEADS, D), y[..., G, :], y[..., G + 1, :]


KINDS = ["gqa", "mla", "fused-qkv", "fused-grouped"]
LAYOUTS = {
    "gqa": oc.QKLayout(),  # kv_heads read from the shapes.
    "mla": oc.QKLayout("wq_b", "wkv_b", nope_dim=NOPE),
    "fused-qkv": oc.QKLayout("qkv", head_axis=-1, kv_heads=KV, fused="qkv"),
    "fused-grouped": oc.QKLayout("qkv", head_axis=-3, kv_heads=KV,
                                 fused="grouped"),
}


def make(kind, seed=0, layers=()):
  """The layer's graph and parameters (NumPy, float32, a leading axis per
  entry of ``layers``), with query heads 0 and 1 made large so that their
  logits stand out (under GQA they form group 0)."""
  build = {"gqa": GQA, "mla": MLA}.get(kind) or functools.partial(
      Fused, order=kind.split("-")[1])
  graph, state = nnx.split(nnx.eval_shape(lambda: build(nnx.Rngs(0))),
                           nnx.Param)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(
      lambda a: (0.5 * rng.standard_normal((*layers, *a.shape))).astype(
          np.float32), nnx.to_pure_dict(state))
  if kind == "gqa":
    params["query"]["kernel"][..., :G, :] *= 5.0
  elif kind == "mla":
    params["wq_b"]["kernel"][..., :2, :] *= 4.0
  else:  # Group 0's query heads lead the outputs in both orders.
    k = params["qkv"]["kernel"]
    flat = k.reshape(*k.shape[:len(layers) + 1], -1)
    flat[..., :G * D] *= 5.0
    params["qkv"]["kernel"] = flat.reshape(k.shape)
  return graph, params


def np_logits(kind, p, x):
  """Each query head's max logit, float64, from the weights alone."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  x = np.asarray(x, np.float64)

  def dense(w, y):
    out = np.tensordot(y, w["kernel"], axes=1)
    return out + w["bias"] if "bias" in w else out

  if kind == "gqa":
    q, k = dense(p["query"], x), dense(p["key"], x)
  elif kind == "mla":
    q = dense(p["wq_b"], dense(p["wq_a"], x))
    kv = dense(p["wkv_a"], x)
    c = kv[..., :RANK]
    c = c / np.sqrt(np.mean(c ** 2, -1, keepdims=True) + 1e-6) * p[
        "kv_norm"]["scale"]
    k_r = _rope(kv[..., None, RANK:], np)
    q = np.concatenate([q[..., :NOPE], _rope(q[..., NOPE:], np)], -1)
    k = np.concatenate([dense(p["wkv_b"], c)[..., :NOPE], np.broadcast_to(
        k_r, (*k_r.shape[:-2], HEADS, ROPE))], -1)
  else:
    q, k, _ = split_qkv(dense(p["qkv"], x), kind.split("-")[1])
  k = np.repeat(k, HEADS // k.shape[-2], axis=-2)
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
  return s.max(axis=(0, 2, 3))


def np_rule(kind, w, s, tau, alpha):
  """The weights after the published rule, float64: Megatron-LM's
  ``clip_qk`` for GQA and fused qkv (one factor per key head, from its
  group's largest logit: ``eta = min(1, tau / max)``, the group's queries
  times ``eta ** alpha``, its key ``eta ** (1 - alpha)``, values alone);
  Kimi K2's MLA (``q^C`` times ``eta ** alpha``, ``k^C`` ``eta ** (1 -
  alpha)``, ``q^R`` ``eta``; ``k^R`` and values alone). ``w``: the layer's
  parameters, with a leading layer axis when ``s`` is ``(layers, heads)``.
  NaN and infinite logits set no factor."""
  w = jax.tree.map(lambda a: np.array(a, np.float64), w)
  s = np.asarray(s, np.float64)
  for idx in np.ndindex(*s.shape[:-1]):  # Each layer: views into w.
    layer = jax.tree.map(lambda a, idx=idx: a[idx], w)
    eta = [min(1.0, tau / x) if np.isfinite(x) else 1.0 for x in s[idx]]
    if kind == "mla":
      for h, e in enumerate(eta):
        for name in ("kernel", "bias"):
          layer["wq_b"][name][..., h, :NOPE] *= e ** alpha
          layer["wq_b"][name][..., h, NOPE:] *= e
          layer["wkv_b"][name][..., h, :NOPE] *= e ** (1 - alpha)
      continue
    eta = [min(eta[g * G:(g + 1) * G]) for g in range(KV)]
    for name in ("kernel", "bias"):
      if kind == "gqa":
        for g, e in enumerate(eta):
          layer["query"][name][..., g * G:(g + 1) * G, :] *= e ** alpha
          layer["key"][name][..., g, :] *= e ** (1 - alpha)
        continue
      x = layer["qkv"][name]
      flat = x.reshape(*x.shape[:x.ndim - (1 if kind == "fused-qkv" else 3)],
                       -1)
      for g, e in enumerate(eta):
        if kind == "fused-qkv":  # [q heads | k heads | v heads]
          flat[..., g * G * D:(g + 1) * G * D] *= e ** alpha
          flat[..., (HEADS + g) * D:(HEADS + g + 1) * D] *= e ** (1 - alpha)
        else:  # Per key head: its G query heads, the key, the value.
          at = g * (G + 2) * D
          flat[..., at:at + G * D] *= e ** alpha
          flat[..., at + G * D:at + (G + 1) * D] *= e ** (1 - alpha)
  return w


@functools.partial(jax.jit, static_argnums=(0, 5))
def clip_layer(graph, params, update, limit, alpha, kind):
  """The layer's recorded max logits, and its parameters after one
  ``qk_clip(limit, query_exponent=alpha)`` step of ``update``."""
  model = nnx.merge(graph, params)
  forward = nnx.capture(lambda m, x: m(x, sow_weights=True), nnx.Intermediate)
  s = oc.gather_max_logits(forward(model, X)[1])
  tx = oc.qk_clip(limit, query_exponent=alpha, layout=LAYOUTS[kind])
  u, state = tx.update(update, tx.init(params), params, max_logits=s)
  return s[""], optax.apply_updates(params, u), state


# Kimi K2's 0.5 for MLA; the extremes (query alone, key alone) for fused.
ALPHA = {"gqa": 0.5, "mla": 0.5, "fused-qkv": 1.0, "fused-grouped": 0.0}


@needs_capture
@pytest.mark.parametrize("kind", KINDS)
def test_layouts_on_a_layer_shrink_each_head_by_its_factor(kind):
  graph, w = make(kind)
  want = np_logits(kind, w, X)
  limit = float(np.sort(want)[1]) + 0.5  # Heads 0 and 1 exceed it.
  assert np.all(want[:2] > limit) and np.all(want[2:] < limit)
  gamma = np.minimum(1.0, limit / want)
  if kind != "mla":  # One factor per group: its largest logit's.
    gamma = np.repeat(gamma.reshape(KV, G).min(-1), G)
  rng = np.random.default_rng(1)
  step = jax.tree.map(
      lambda a: (0.02 * rng.standard_normal(a.shape)).astype(a.dtype), w)
  for u in (jax.tree.map(np.zeros_like, w), step):
    s, new, state = clip_layer(graph, w, u, limit, ALPHA[kind], kind)
    np.testing.assert_allclose(s, want, rtol=1e-5)  # Recorded as computed.
    free = jax.tree.map(lambda a, b: a + b, w, u)  # float32, as optax adds.
    after, before = np_logits(kind, new, X), np_logits(kind, free, X)
    # Every logit of a clipped head shrinks by its factor: without an
    # update, the largest lands on the cap; other heads are untouched.
    np.testing.assert_allclose(after, gamma * before, rtol=1e-5)
    assert np.all(after[2:] == before[2:])
    if u is not step:
      np.testing.assert_allclose(after[:2].max(), limit, rtol=1e-5)
    rule = np_rule(kind, free, want, limit, ALPHA[kind])
    for got, ref, old in zip(*map(jax.tree.leaves, (new, rule, free))):
      np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)
      alone = ref == np.asarray(old, np.float64)  # Values, k^R, heads 2, 3.
      np.testing.assert_array_equal(np.asarray(got)[alone], old[alone])
    assert int(state.num_heads_clipped) == 2
    np.testing.assert_allclose(float(state.stats.scale), gamma.min(),
                               rtol=1e-5)


@pytest.mark.parametrize("kind", ["gqa", "fused-grouped"])  # MLA: scanned.
def test_layouts_of_stacked_layers_match_the_rule(kind):
  graph, w = make(kind, seed=3, layers=(2,))
  rng = np.random.default_rng(3)
  s = rng.choice([0.0, 50.0, 150.0, 1e4, 100.0, np.nan], size=(2, HEADS))
  s[0, :2] = [400.0, np.nan]  # A NaN head beside a clipped one.
  u = jax.tree.map(lambda a: 0.1 * a, w)
  tx = oc.qk_clip(100.0, query_exponent=0.3, layout=LAYOUTS[kind])
  out, state = tx.update(u, tx.init(w), w, max_logits={"": s})
  new = optax.apply_updates(w, out)
  free = jax.tree.map(lambda a, b: a + b, w, u)
  rule = np_rule(kind, free, s, 100.0, 0.3)
  for got, ref, old in zip(*map(jax.tree.leaves, (new, rule, free))):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)
    alone = ref == np.asarray(old, np.float64)
    np.testing.assert_array_equal(np.asarray(got)[alone], old[alone])
  eta = np.where(np.isfinite(s) & (s > 100), 100 / np.where(s > 0, s, 1), 1)
  if kind != "mla":
    eta = np.repeat(eta.reshape(2, KV, G).min(-1), G, axis=-1)
  assert int(state.num_heads_clipped) == int(np.sum(eta < 1))
  assert int(state.num_nonfinite) == int(np.sum(np.isnan(s)))


@needs_capture
@pytest.mark.slow
def test_latent_attention_stacked_and_scanned():
  layers = 2

  class Stack(nnx.Module):
    def __init__(self, rngs):
      @nnx.split_rngs(splits=layers)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def build(rngs):
        return MLA(rngs)
      self.layers = build(rngs)

    def __call__(self, x, sow_weights=False):
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def body(x, layer):
        return x + layer(x, sow_weights=sow_weights)
      return body(x, self.layers)

  graph = nnx.split(nnx.eval_shape(lambda: Stack(nnx.Rngs(0))), nnx.Param)[0]
  params = {"layers": make("mla", layers=(layers,))[1]}
  model = nnx.merge(graph, params)
  s = recorded(model, X)
  assert list(s) == ["layers"] and s["layers"].shape == (layers, HEADS)
  first = jax.tree.map(lambda a: a[0], params["layers"])
  np.testing.assert_allclose(np_logits("mla", first, X), s["layers"][0],
                             rtol=1e-5)
  limit = float(np.median(s["layers"]))
  tx = oc.qk_clip(limit, layout={"layers": LAYOUTS["mla"]})
  zero = jax.tree.map(jnp.zeros_like, params)
  u, _ = jax.jit(tx.update)(zero, tx.init(params), params, max_logits=s)
  new = optax.apply_updates(params, u)
  np.testing.assert_allclose(  # Layer 0 sees X: its heads land on the cap.
      np_logits("mla", jax.tree.map(lambda a: a[0], new["layers"]), X),
      np.minimum(s["layers"][0], limit), rtol=1e-5)
  rule = np_rule("mla", params["layers"], s["layers"], limit, 0.5)
  for got, ref in zip(jax.tree.leaves(new["layers"]), jax.tree.leaves(rule)):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("key_heads, layout, match", [
    (3, oc.QKLayout(), r"\(the key 'key/kernel' holds 12 outputs, the query"
     r" 'query/kernel' 16\) cannot be shared evenly by the 4 query heads"),
    (2, oc.QKLayout(kv_heads=3), "kv_heads=3"),
    (2, oc.QKLayout(nope_dim=5), "nope_dim=5 exceeds the 4 entries"),
    (2, oc.QKLayout("qkv", head_axis=-1, kv_heads=1, fused="qkv"),
     r"'qkv/kernel' of shape \(8, 32\) does not hold 6 heads"),
    (2, oc.QKLayout(head_axis=-4), "has no axis -4"),
])
def test_layouts_that_do_not_fit_the_leaves(key_heads, layout, match):
  params = {"query": {"kernel": jnp.ones((IN, HEADS, D))},
            "key": {"kernel": jnp.ones((IN, key_heads, D))},
            "qkv": {"kernel": jnp.ones((IN, (HEADS + 2 * KV) * D))}}
  tx = oc.qk_clip(layout=layout)
  with pytest.raises(ValueError, match=match):
    tx.update(params, tx.init(params), params, max_logits=jnp.ones(HEADS))


@pytest.mark.slow
def test_max_logit_attention_with_grouped_heads():
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((2, 3, h, D)) for h in (HEADS, KV, KV))
  got = oc.max_logit_attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)))
  # Query head h attends with key and value head h // G, in float64.
  s = np.einsum("bqhd,bkhd->bhqk", q, np.repeat(k, G, 2)) / math.sqrt(D)
  p = np.exp(s - s.max(-1, keepdims=True))
  want = np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True),
                   np.repeat(v, G, 2))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_max_logit_attention_needs_key_heads_that_divide_the_query_heads():
  q, k = jnp.ones((1, 3, HEADS, D)), jnp.ones((1, 3, 3, D))
  with pytest.raises(ValueError, match="query has 4 heads, key 3 and value 3"):
    oc.max_logit_attention(q, k, k)
  with pytest.raises(ValueError, match="key 2 and value 4"):
    oc.max_logit_attention(q, k[..., :2, :], q)
