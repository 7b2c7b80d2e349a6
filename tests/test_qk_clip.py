"""qk_clip: logits of nnx.MultiHeadAttention held at max_logit, the paper's
rule (Kimi K2's Algorithm 1) in float64 NumPy, stacked layers, jit and
meshes, edge cases and errors."""

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
