"""adaptive_grad_clip: against optax.adaptive_grad_clip, stats, jit, errors."""

import functools

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optaxclip as oc
from tests._helpers import JIT, maybe_jit

# Every layout optax.adaptive_grad_clip knows with axis=None.
DEFAULT_SHAPES = {
    "scalar": (), "vector": (7,), "row": (1, 6), "column": (6, 1),
    "dense": (5, 4), "multihead": (3, 4, 5), "conv2d": (3, 3, 2, 4),
    "conv3d": (2, 2, 2, 3, 4),
}
SMALL_SHAPES = {"vector": (7,), "dense": (5, 4), "conv2d": (3, 3, 2, 4)}
# Custom axes, each applied to every leaf of its tree.
CUSTOM = {
    "rows": (1, [(4, 6), (3, 6)]),
    "pair": ((0, 2), [(3, 4, 5), (2, 2, 2)]),
    "last": (-1, [(4, 6), (2, 3, 5)]),
    "six_d": ((0, 1, 2, 3, 4), [(2, 3, 2, 2, 2, 3)]),
}


def make(shapes, dtype=jnp.float32, seed=0, zero_param=True):
  """Params and grads; some units' grads are far larger than their params."""
  rng = np.random.default_rng(seed)
  params, grads = {}, {}
  for i, (name, shape) in enumerate(shapes.items()):
    p = rng.standard_normal(shape)
    if zero_param and i == 0:
      p = np.zeros(shape)  # Exercises the eps floor.
    g = rng.standard_normal(shape) * 0.01
    g = g * np.exp(3 * rng.standard_normal(shape[-1:] or ()))  # Mixed units.
    params[name] = jnp.asarray(p, dtype)
    grads[name] = jnp.asarray(g, dtype)
  return params, grads


@functools.partial(jax.jit, static_argnames="axis")
def optax_agc(clipping, eps, axis, grads, params):
  tx = optax.adaptive_grad_clip(clipping, eps, axis)
  return tx.update(grads, tx.init(params), params)[0]


@functools.partial(jax.jit, static_argnames="axis")
def ours(clipping, grads, params, axis=None):
  """One compiled program per tree shape and dtype; ``clipping`` is traced."""
  tx = oc.adaptive_grad_clip(clipping, axis=axis, leaf_norms=True)
  return tx.update(grads, tx.init(params), params)


@pytest.mark.parametrize("clipping", [0.01, 0.1, 1.0])
@pytest.mark.parametrize("dtype, tol", [
    (jnp.float32, 1e-6), (jnp.bfloat16, 2e-2), (jnp.float16, 2e-3)],
    ids=["float32", "bfloat16", "float16"])
@pytest.mark.slow
def test_default_axes_match_optax(dtype, tol, clipping):
  params, grads = make(DEFAULT_SHAPES, dtype)
  expected = optax_agc(clipping, 1e-3, None, grads, params)
  got, state = ours(clipping, grads, params)
  chex.assert_trees_all_equal_dtypes(got, grads)
  chex.assert_trees_all_close(
      jax.tree.map(lambda x: x.astype(jnp.float32), got),
      jax.tree.map(lambda x: x.astype(jnp.float32), expected),
      rtol=tol, atol=tol * 1e-3)
  changed = sum(int(np.sum(np.any(
      np.asarray(a, np.float32) != np.asarray(b, np.float32),
      axis=_axes(n)))) for n, a, b in _items(expected, grads))
  if dtype == jnp.float32:  # The count of clipped units matches optax's.
    units = sum(np.size(v) for v in jax.tree.leaves(state.stats.leaf_norms))
    np.testing.assert_allclose(state.stats.frac_clipped, changed / units,
                               rtol=1e-6)
    assert 0 < changed < units


@pytest.mark.parametrize("name", list(CUSTOM))
def test_custom_axis_matches_optax(name):
  axis, shapes = CUSTOM[name]
  params, grads = make({f"x{i}": s for i, s in enumerate(shapes)})
  expected = optax_agc(0.05, 1e-3, axis, grads, params)
  got, state = ours(0.05, grads, params, axis=axis)
  chex.assert_trees_all_close(got, expected, rtol=1e-6, atol=1e-9)
  for key, shape in zip(sorted(grads), shapes):
    axes = {a % len(shape) for a in np.atleast_1d(axis)}
    assert state.stats.leaf_norms[key].shape == tuple(
        d for i, d in enumerate(shape) if i not in axes)


def test_float64_matches_optax():
  with jax.enable_x64(True):
    params, grads = make(DEFAULT_SHAPES, jnp.float64)
    expected = optax_agc(0.1, 1e-3, None, grads, params)
    got, state = ours(0.1, grads, params)
    chex.assert_trees_all_close(got, expected, rtol=1e-12)
    assert state.stats.leaf_norms["dense"].dtype == jnp.float64
    assert state.ratio.dtype == jnp.float64
    assert state.stats.scale.dtype == jnp.float64


def test_bfloat16_param_norm_in_float32_is_exact():
  # The threshold uses float32 norms of bfloat16 params, not bf16 ones.
  params, grads = make({"dense": (64, 3)}, jnp.bfloat16, zero_param=False)
  _, state = ours(0.5, grads, params)
  pn = np.linalg.norm(np.asarray(params["dense"], np.float64), axis=0)
  gn = np.linalg.norm(np.asarray(grads["dense"], np.float64), axis=0)
  np.testing.assert_allclose(state.ratio, np.max(gn / pn), rtol=1e-6)


def _axes(name):
  shape = DEFAULT_SHAPES[name]
  if sum(d != 1 for d in shape) <= 1:
    return tuple(range(len(shape)))
  return (0,) if len(shape) in (2, 3) else tuple(range(len(shape) - 1))


def _items(a, b):
  return [(k, a[k], b[k]) for k in sorted(a)]


def test_state_holds_unit_norms_ratio_and_scale():
  params = {"w": jnp.array([[3.0, 0.0], [4.0, 1.0]]), "b": jnp.zeros(2)}
  grads = {"w": jnp.array([[1.0, 0.0], [0.0, 0.05]]),
           "b": jnp.array([0.0, 1e-3])}
  tx = oc.adaptive_grad_clip(0.1, eps=1e-3, leaf_norms=True)
  updates, state = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(state.stats.leaf_norms["w"], [1.0, 0.05])
  assert state.stats.leaf_norms["b"].shape == ()
  assert state.stats.norm is None  # The rule compares ratios.
  # Unit ratios |g| / max(|w|, eps): w 1/5 and 0.05/1; b 1e-3 / 1e-3 (the
  # eps floor). Factors: w 0.1 * 5 / 1 = 0.5 and 1; b 0.1.
  np.testing.assert_allclose(state.ratio, 1.0, rtol=1e-6)
  np.testing.assert_allclose(state.stats.threshold, 0.1)
  np.testing.assert_allclose(state.stats.scale, 0.1, rtol=1e-6)
  np.testing.assert_allclose(updates["w"], [[0.5, 0.0], [0.0, 0.05]])
  np.testing.assert_allclose(updates["b"], [0.0, 1e-4], rtol=1e-6)
  np.testing.assert_allclose(state.stats.frac_clipped, 2 / 3)
  assert bool(state.stats.clipped) and int(state.stats.num_clipped) == 1
  assert bool(state.stats.clipped) == (float(state.ratio) > 0.1)


def test_units_below_threshold_are_bit_identical():
  params, grads = make(DEFAULT_SHAPES, seed=4)
  updates, state = ours(0.1, grads, params)
  for key in grads:
    red = _axes(key)
    w = np.asarray(params[key], np.float64)
    t = 0.1 * np.maximum(np.sqrt(np.sum(w ** 2, axis=red)), 1e-3)
    norm = np.asarray(state.stats.leaf_norms[key], np.float64)
    keep = norm <= t * (1 - 1e-6)
    g = np.asarray(grads[key])
    u = np.asarray(updates[key])
    mask = np.broadcast_to(np.expand_dims(keep, red), g.shape)
    np.testing.assert_array_equal(u[mask], g[mask])
    over = np.broadcast_to(np.expand_dims(norm > t * (1 + 1e-6), red),
                           g.shape)
    assert np.all(np.abs(u[over]) <= np.abs(g[over]))
    assert not np.array_equal(u[over], g[over]) or not over.any()


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(list(DEFAULT_SHAPES.values())),
       st.floats(1e-3, 10.0), st.integers(0, 2**31 - 1),
       hnp.arrays(np.float32, 4, elements=st.floats(-4, 4, width=32)))
def test_property_unit_norms_at_most_threshold(shape, clipping, seed, logs):
  rng = np.random.default_rng(seed)
  p = jnp.asarray(rng.standard_normal(shape) * 10.0 ** logs[0], jnp.float32)
  g = jnp.asarray(rng.standard_normal(shape) * 10.0 ** logs[1], jnp.float32)
  updates, _ = ours(clipping, {"x": g}, {"x": p})
  axes = _axes_for(shape)
  out = np.sqrt(np.sum(np.square(np.asarray(updates["x"], np.float64)),
                       axis=axes))
  pn = np.sqrt(np.sum(np.square(np.asarray(p, np.float64)), axis=axes))
  bound = clipping * np.maximum(pn, 1e-3)
  assert np.all(out <= bound * (1 + 1e-5))
  gn = np.sqrt(np.sum(np.square(np.asarray(g, np.float64)), axis=axes))
  below = np.broadcast_to(np.expand_dims(gn < bound * (1 - 1e-5), axes),
                          shape)
  np.testing.assert_array_equal(np.asarray(updates["x"])[below],
                                np.asarray(g)[below])


def _axes_for(shape):
  if sum(d != 1 for d in shape) <= 1:
    return tuple(range(len(shape)))
  return (0,) if len(shape) in (2, 3) else tuple(range(len(shape) - 1))


def test_missing_params_is_a_clear_error():
  tx = oc.adaptive_grad_clip(0.1)
  g = {"w": jnp.ones((2, 3))}
  with pytest.raises(ValueError, match=r"adaptive_grad_clip needs params: "
                     r"call update\(grads, state, params\)"):
    tx.update(g, tx.init(g))


def test_bad_inputs():
  with pytest.raises(ValueError, match="clipping"):
    oc.adaptive_grad_clip(-0.1)
  with pytest.raises(ValueError, match="eps"):
    oc.adaptive_grad_clip(0.1, eps=float("nan"))
  with pytest.raises(TypeError, match="clipping"):
    oc.adaptive_grad_clip("0.1")
  tx = oc.adaptive_grad_clip(0.1)
  six = {"w": jnp.ones((2, 2, 2, 2, 2, 2))}
  with pytest.raises(ValueError, match=r"\['w'\].*axis="):
    tx.init(six)
  g = {"w": jnp.ones((2, 3))}
  with pytest.raises(ValueError, match="shape"):
    tx.update(g, tx.init(g), {"w": jnp.ones((3, 2))})
  with pytest.raises(ValueError, match="structure"):
    tx.update(g, tx.init(g), {"v": jnp.ones((2, 3))})
  with pytest.raises(ValueError, match="axis=2"):
    oc.adaptive_grad_clip(0.1, axis=2).init(g)
  with pytest.raises(TypeError, match="positional"):
    oc.adaptive_grad_clip(0.1, 1e-3, 1, 2)  # optax's three at most.
  # clipping, eps, axis: positional as in optax.
  np.testing.assert_allclose(
      oc.adaptive_grad_clip(0.1, 1e-3, 1).update(g, tx.init(g), g)[0]["w"],
      optax.adaptive_grad_clip(0.1, 1e-3, 1).update(g, None, g)[0]["w"])
  with pytest.raises(TypeError, match="dtype"):
    tx.init({"w": jnp.ones(3, jnp.int32)})


@pytest.mark.parametrize("returned", ["0.01", "hello", None, 1j])
def test_a_schedule_returning_no_real_number_is_a_clear_error(returned):
  # A string such as "0.01" would be parsed as a number by jnp.asarray.
  g = {"w": jnp.ones((2, 3))}
  for tx in (oc.adaptive_grad_clip(lambda count: returned),
             oc.adaptive_grad_clip(0.01, lambda count: returned)):
    with pytest.raises(TypeError, match=r"adaptive_grad_clip: (clipping|eps)"
                       r" must be a real number.*schedule returned"):
      tx.update(g, tx.init(g), g)


def test_schedule_and_inject_hyperparams():
  params, grads = make(SMALL_SHAPES, seed=2)
  sched = optax.linear_schedule(0.01, 1.0, 4)
  tx = oc.adaptive_grad_clip(sched)
  injected = optax.inject_hyperparams(oc.adaptive_grad_clip)(clipping=0.01)
  state, istate = tx.init(params), injected.init(params)
  update, iupdate = jax.jit(tx.update), jax.jit(injected.update)
  for step in range(3):
    c = float(sched(step))
    expected = optax_agc(c, 1e-3, None, grads, params)
    got, state = update(grads, state, params)
    chex.assert_trees_all_close(got, expected, rtol=1e-6, atol=1e-9)
    istate.hyperparams["clipping"] = jnp.asarray(c)
    got, istate = iupdate(grads, istate, params)
    chex.assert_trees_all_close(got, expected, rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(
      optax.tree.get(istate, "frac_clipped"),
      optax.tree.get(state, "frac_clipped"))


def test_inject_hyperparams_with_axis_static():
  params, grads = make({"a": (4, 6)})
  tx = optax.inject_hyperparams(oc.adaptive_grad_clip, static_args="axis")(
      0.05, axis=1)
  got, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  chex.assert_trees_all_close(got, optax_agc(0.05, 1e-3, 1, grads, params),
                              rtol=1e-6)


def test_masked_and_none_leaves_pass_through():
  params, grads = make({"w": (5, 4), "b": (4,)})
  params["frozen"], grads["frozen"] = None, None
  tx = optax.masked(oc.adaptive_grad_clip(0.01), {"w": True, "b": False,
                                                  "frozen": False})
  updates, state = tx.update(grads, tx.init(params), params)
  chex.assert_trees_all_equal(updates["b"], grads["b"])
  assert updates["frozen"] is None
  chex.assert_trees_all_close(
      updates["w"], optax_agc(0.01, 1e-3, None, {"w": grads["w"]},
                              {"w": params["w"]})["w"], rtol=1e-6)


def test_stats_in_a_chain():
  params, grads = make(SMALL_SHAPES, seed=5)
  opt = optax.chain(oc.adaptive_grad_clip(0.05), optax.sgd(0.1))
  _, state = jax.jit(opt.update)(grads, opt.init(params), params)
  stats = oc.clip_stats(state)
  assert set(stats) == {f"adaptive_grad_clip/{k}" for k in (
      "count", "threshold", "scale", "clipped", "num_clipped",
      "frac_clipped", "ratio")}
  frac = stats["adaptive_grad_clip/frac_clipped"]
  assert 0 < float(frac) < 1
  assert optax.tree.get(state, "frac_clipped") is frac


def test_jit_no_retrace_no_transfer():
  params, grads = make(SMALL_SHAPES, seed=6)
  traces = []
  tx = oc.adaptive_grad_clip(optax.cosine_decay_schedule(0.1, 50))

  @jax.jit
  def update(g, s, p):
    traces.append(1)  # Runs only when jax traces.
    return tx.update(g, s, p)

  params, grads = jax.device_put((params, grads))
  state = jax.device_put(tx.init(params))
  jax.block_until_ready(update(grads, state, params))
  with jax.transfer_guard("disallow"):
    for _ in range(60):
      updates, state = update(grads, state, params)
    jax.block_until_ready((updates, state))
  assert len(traces) == 1 and int(state.stats.count) == 60


@pytest.mark.parametrize(**JIT)
def test_matches_optax(jitted):
  params, grads = make(SMALL_SHAPES, seed=7)
  tx = oc.adaptive_grad_clip(0.02)
  got, _ = maybe_jit(tx.update, jitted)(grads, tx.init(params), params)
  chex.assert_trees_all_close(
      got, optax_agc(0.02, 1e-3, None, grads, params), rtol=1e-6,
      atol=1e-9)
