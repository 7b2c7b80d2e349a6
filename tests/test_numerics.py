"""The one scale rule, run-time hyper-parameters and gradients through clippers."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import optaxclip as oc
from optaxclip import _norms, _numerics, _thresholds
from tests import _helpers as helpers

INF, NAN = math.inf, math.nan


# ----------------------------------------------------------------------------
# clip_factors: the edge-case table of its docstring, row by row.


@pytest.mark.parametrize("norm, t, want", [
    (0.5, 1.0, 1.0),      # n < t: exactly 1.
    (1.0, 1.0, 1.0),      # n == t: exactly 1, not clipped.
    (0.0, 1.0, 1.0),      # Zero norm.
    (0.0, 0.0, 1.0),      # Zero norm, zero threshold.
    (5.0, INF, 1.0),      # Infinite threshold.
    (INF, INF, 1.0),      # Infinite norm and threshold.
    (5.0, 0.0, 0.0),      # Zero threshold.
    (5.0, -1.0, 0.0),     # A negative threshold acts as 0.
    (5.0, NAN, 0.0),      # A NaN threshold acts as 0.
    (INF, 1.0, 0.0),      # Infinite norm, finite threshold.
    (NAN, 1.0, NAN),      # NaN norm: NaN.
    (NAN, INF, NAN),
    (4.0, 1.0, 0.25),
])
def test_clip_factors_edge_cases(norm, t, want):
  s = _numerics.clip_factors(jnp.float32(norm), jnp.float32(t))
  np.testing.assert_array_equal(np.float32(s.value()), np.float32(want))
  if want == 1.0:  # Bit for bit: both factors are exactly 1.
    assert float(s.a) == 1.0 and float(s.b) == 1.0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_subnormal_scale_keeps_the_direction(dtype):
  # 1 / 1.414e38 is below float32's smallest normal; a flushed factor would
  # zero the update.
  g = jnp.asarray([1e38, 1e38], dtype)
  tx = oc.clip_by_global_norm(1.0)
  updates, state = tx.update(g, tx.init(g))
  assert updates.dtype == dtype
  np.testing.assert_allclose(np.asarray(updates, np.float64),
                             [1 / math.sqrt(2)] * 2, rtol=1e-2)
  assert float(state.stats.scale) < np.finfo(np.float32).tiny * 2


@pytest.mark.parametrize("t", [1.0, 1e-20, 1e30])
def test_norm_beyond_float32_range_clips_exactly(t):
  g = {"a": jnp.asarray([3e38, -3e38], jnp.float32),
       "b": jnp.asarray([[3e38]], jnp.float32)}
  tx = oc.clip_by_global_norm(t)
  updates, state = jax.jit(tx.update)(g, tx.init(g))
  assert math.isinf(float(state.stats.norm))  # 5.2e38 > float32's max.
  want = t / math.sqrt(3)
  np.testing.assert_allclose(np.asarray(updates["a"], np.float64),
                             [want, -want], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(updates["b"], np.float64), [[want]],
                             rtol=1e-6)
  assert bool(state.stats.clipped)


def test_per_leaf_clippers_keep_the_direction_of_huge_leaves():
  g = {"a": jnp.asarray([3e38, 3e38], jnp.float32),
       "b": jnp.asarray([1.0, 0.0], jnp.float32)}
  # One program for both thresholds: the threshold is a traced argument.
  # The gradients are an argument too: as constants of the program, XLA
  # would fold the huge values itself, by other rules than the kernels'.
  def one(t, g):
    tx = oc.clip_by_norm(t)
    return tx.update(g, tx.init(g))

  updates, states = jax.jit(jax.vmap(one, (0, None)))(
      jnp.asarray([1.0, 1e-30], jnp.float32), g)
  for i, t in enumerate([1.0, 1e-30]):
    assert float(states.stats.threshold[i]) == np.float32(t)
    np.testing.assert_allclose(np.asarray(updates["a"][i], np.float64),
                               [np.float32(t) / math.sqrt(2)] * 2, rtol=1e-6)
    np.testing.assert_allclose(updates["b"][i], [min(1.0, t), 0.0],
                               rtol=1e-6)


# ----------------------------------------------------------------------------
# resolve: values that arrive at run time.


@pytest.mark.parametrize("value, kw, want", [
    (-1.0, {}, 0.0), (NAN, {}, 0.0), (2.0, {}, 2.0), (INF, {}, INF),
    (1.5, {"hi": 1.0}, 1.0), (-3.0, {"lo": -INF, "nan": 0.0}, -3.0),
    (NAN, {"lo": -INF, "nan": 0.0}, 0.0)])
def test_resolve_clamps_run_time_values(value, kw, want):
  got = _thresholds.resolve(lambda count: value, jnp.zeros((), jnp.int32),
                        jnp.float32, **kw)
  assert float(got) == want


_BAD_CASES = {  # name: (factory, its threshold argument, other arguments)
    "clip_by_global_norm": (oc.clip_by_global_norm, "max_norm", {}),
    "clip_by_norm": (oc.clip_by_norm, "max_norm", {}),
    "zclip": (oc.zclip, "max_norm", {"rule": oc.ZScore(warmup_steps=1)}),
    "adaptive_grad_clip": (oc.adaptive_grad_clip, "clipping", {}),
}


@pytest.mark.parametrize("name", list(_BAD_CASES))
def test_bad_run_time_thresholds_never_flip_or_poison(name):
  factory, arg, other = _BAD_CASES[name]
  g = {"w": jnp.asarray([3.0, 4.0])}
  params = {"w": jnp.asarray([1.0, 1.0])}
  bads = [-1.0, NAN]
  # As a schedule (its value a traced argument: one program for both).
  updates, _ = helpers.sweep(
      lambda bad: factory(**{arg: lambda count: bad}, **other), bads, g,
      params)
  np.testing.assert_array_equal(updates["w"], np.zeros((2, 2)), err_msg=name)
  # As a value injected by inject_hyperparams (one compiled step).
  inj = optax.inject_hyperparams(factory)(**{arg: 1.0}, **other)
  step = jax.jit(inj.update)
  for bad in bads:
    state = inj.init(params)
    state.hyperparams[arg] = jnp.asarray(bad)
    updates, _ = step(g, state, params)
    np.testing.assert_array_equal(updates["w"], [0.0, 0.0],
                                  err_msg=f"{name} {bad}")


def test_recorded_threshold_is_the_one_in_force():
  tx = oc.clip_by_global_norm(lambda count: -2.0)
  g = jnp.asarray([3.0, 4.0])
  _, state = tx.update(g, tx.init(g))
  assert float(state.stats.threshold) == 0.0
  assert float(state.stats.scale) == 0.0


def test_quantile_and_zclip_clamp_their_run_time_hyperparameters():
  g = jnp.asarray([3.0, 4.0])
  tx = oc.clip_by_quantile(lambda count: NAN)
  state = tx.init(g)
  for _ in range(3):
    updates, state = tx.update(g, state)
    assert np.all(np.isfinite(updates))
  tx = oc.zclip(oc.ZScore(decay=lambda count: 2.0, num_std=lambda count: -1.0,
                          warmup_steps=1))
  state = tx.init(g)
  for _ in range(3):
    updates, state = tx.update(g, state)
    assert np.all(np.isfinite(updates)) and np.isfinite(float(state.mean))


def test_hyperparameters_without_schedules_are_rejected_at_construction():
  with pytest.raises(TypeError, match="std_floor does not take a schedule"):
    oc.zclip(oc.ZScore(std_floor=optax.constant_schedule(1e-2)))
  with pytest.raises(TypeError, match="decay does not take a schedule"):
    oc.skip_step(optax.sgd(0.1), rule=oc.SpikeEMA(
        max_ratio=2.0, decay=optax.constant_schedule(0.9)))
  with pytest.raises(TypeError, match="max_ratio does not take a schedule"):
    oc.skip_step(optax.sgd(0.1), rule=oc.SpikeEMA(max_ratio=lambda c: 2.0))


# ----------------------------------------------------------------------------
# Gradients through the clippers: finite everywhere, and right.


def _clippers():
  return {
      "global_norm": oc.clip_by_global_norm(1.0),
      "global_norm_l1": oc.clip_by_global_norm(1.0, ord=1),
      "global_norm_rms": oc.clip_by_global_norm(1.0, ord="rms"),
      "global_norm_p3": oc.clip_by_global_norm(1.0, ord=3),
      "norm": oc.clip_by_norm(1.0),
      "norm_axis": oc.clip_by_norm(1.0, axis=0),
      "agc": oc.adaptive_grad_clip(0.5),
      "quantile": oc.clip_by_quantile(0.5),
      "zclip": oc.zclip(oc.ZScore(warmup_steps=1), max_norm=1.0),
      "value": oc.clip_by_value(1.0),
  }


@functools.cache
def _loss(name):
  """A loss of the clipped update, jitted once per clipper: ``f(g, params)``."""
  tx = _clippers()[name]

  def f(g, params):
    updates, _ = tx.update(g, tx.init(params), params)
    return sum(jnp.sum(jnp.sin(u) * (i + 1.0))
               for i, u in enumerate(jax.tree.leaves(updates)))
  return jax.jit(f)


def _grad(name, g, params):
  """The gradient of ``_loss(name)`` at ``g``, through the same ``vjp`` as
  ``check_grads`` takes: the compiled programs serve both tests."""
  loss = _loss(name)
  _, vjp = jax.vjp(lambda g: loss(g, params), g)
  return vjp(jnp.ones((), jnp.float32))[0]


@pytest.mark.parametrize("name", list(_clippers()))
@pytest.mark.parametrize("where", ["zero", "threshold"])
@pytest.mark.slow
def test_gradient_is_finite_at_zero_and_at_the_threshold(name, where):
  params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
  if where == "zero":
    g = jax.tree.map(jnp.zeros_like, params)
  else:  # Scaled so that its norm is exactly 1 (the threshold).
    g = {"w": jnp.zeros((3, 2)), "b": jnp.asarray([0.6, 0.8])}
  grad = _grad(name, g, params)
  for x in jax.tree.leaves(grad):
    assert np.all(np.isfinite(x)), (name, where, grad)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(_clippers()))
@pytest.mark.parametrize("scale", [0.3, 5.0])  # Below and above threshold.
def test_gradient_matches_finite_differences(name, scale):
  rng = np.random.default_rng(3)
  params = {"w": jnp.asarray(rng.normal(size=(3, 2)) + 2, jnp.float32),
            "b": jnp.asarray(rng.normal(size=2) + 2, jnp.float32)}
  g = jax.tree.map(lambda p: scale * jnp.asarray(
      rng.normal(size=p.shape), jnp.float32), params)
  loss = _loss(name)
  check_grads(lambda g: loss(g, params), (g,), order=1, modes=["rev"],
              atol=2e-2, rtol=2e-2, eps=1e-3)


def test_zero_gradient_has_zero_norm_gradient():
  g = jnp.zeros(4)
  chex.assert_trees_all_equal(jax.jit(jax.grad(oc.global_norm))(g),
                              jnp.zeros(4))
  chex.assert_trees_all_equal(
      jax.jit(jax.grad(lambda x: jnp.sum(_norms.leaf_norms(x, 3.0))))(g),
      jnp.zeros(4))
