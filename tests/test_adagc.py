"""adagc: float64 reference, warm-up boundary, non-finite steps, jit, sharding."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import optaxclip as oc
from tests import _references as ref
from tests._helpers import JIT, maybe_jit, run_scan

SHAPES = {"a": (2, 3), "b": (3,), "c": (4, 2)}
_RNG = np.random.default_rng(0)
DIRECTION = {k: _RNG.standard_normal(s) for k, s in SHAPES.items()}
KEYS = sorted(SHAPES)  # Tree-flattening order of a dict.


def grads_with_norms(norms, dtype=jnp.float32):
  """Stacked gradients: step t, tensor KEYS[i] has 2-norm norms[t, i]."""
  norms = np.asarray(norms, np.float64)
  out = {}
  for i, k in enumerate(KEYS):
    d = DIRECTION[k] / np.linalg.norm(DIRECTION[k])
    n = norms[:, i].reshape((-1,) + (1,) * d.ndim)
    with np.errstate(invalid="ignore"):
      out[k] = jnp.asarray(n * d, dtype)
  return out


def planted_norms(steps, spikes, seed=0):
  """Three tensors with norms around 0.3, 0.05 and 0.8, and planted spikes.

  ``spikes`` maps ``(step, tensor)`` to a factor.
  """
  rng = np.random.default_rng(seed)
  base = np.array([0.3, 0.05, 0.8])
  norms = base * np.exp(0.1 * rng.standard_normal((steps, 3)))
  for (t, i), f in spikes.items():
    norms[t, i] *= f
  return norms


# The reference's names are the paper's.
_PAPER_NAMES = dict(max_ratio="lambda_rel", decay="beta", max_norm="lambda_abs")


def reference(norms, follow=True, **kwargs):
  """The float64 reference run with adagc's keywords under their paper
  names: the paper's Algorithm 1 (``follow=False``), or with a tensor
  clipped at two consecutive steps taking its norm as ``gamma``."""
  paper = {_PAPER_NAMES.get(k, k): v for k, v in kwargs.items()}
  return adagc_follow(norms, **paper) if follow else ref.adagc(norms, **paper)


def adagc_follow(norms, lambda_rel=1.05, beta=0.98, warmup_steps=100,
                 lambda_abs=1.0, eps=0.0):
  """AdaGC's Algorithm 1 in float64 (as ``tests._references.adagc``), and
  after warm-up a tensor clipped at this step and the one before (also
  after warm-up) takes its unclipped norm as ``gamma``."""
  norms = np.asarray(norms, np.float64)
  gamma = np.full(norms.shape[1], np.inf)
  before = np.zeros(norms.shape[1], bool)  # Clipped at the last step.
  out = []
  with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
    for t, n in enumerate(norms, start=1):
      if t <= warmup_steps:
        total = np.sqrt(np.sum(n * n))
        s = 1.0 if total <= lambda_abs else lambda_abs / total
        scale = np.full_like(n, np.nan if np.isnan(total) else s)
        threshold = np.full_like(n, lambda_abs)
        kept = scale * n
        if np.isfinite(total):
          gamma = np.minimum(gamma, kept)
      else:
        threshold = lambda_rel * gamma
        over = (n + eps > threshold) & (n != 0)
        scale = np.where(np.isnan(n), np.nan,
                         np.where(over, threshold / (n + eps), 1.0))
        kept = scale * n
        gamma = np.where(np.isfinite(kept), beta * gamma + (1 - beta) * kept,
                         gamma)
        gamma = np.where((scale < 1) & before & np.isfinite(n), n, gamma)
      before = (scale < 1) & (t > warmup_steps)
      out.append(ref.AdaGCStep(scale=scale, clipped_norms=kept,
                               gamma=gamma.copy(), threshold=threshold))
  return out


def stacked(tree):
  """A tree of per-step scalars as an array [step, tensor]."""
  return np.stack([np.asarray(tree[k], np.float64) for k in KEYS], axis=-1)


def assert_matches(states, updates, expected, rtol=1e-5):
  for name, field in (("scale", "leaf_scales"), ("gamma", "gamma"),
                      ("threshold", "leaf_thresholds")):
    np.testing.assert_allclose(
        stacked(getattr(states, field)),
        np.stack([getattr(e, name) for e in expected]), rtol=rtol,
        err_msg=name)
  out = np.stack([np.linalg.norm(np.asarray(updates[k], np.float64).reshape(
      len(expected), -1), axis=1) for k in KEYS], axis=-1)
  np.testing.assert_allclose(out, np.stack([e.clipped_norms
                                            for e in expected]), rtol=rtol)


@pytest.mark.parametrize("kwargs", [
    dict(warmup_steps=1),
    dict(warmup_steps=1, follow=False),
    dict(warmup_steps=5),
    dict(warmup_steps=5, follow=False),
    dict(warmup_steps=20, max_norm=0.5),
    dict(warmup_steps=10, max_ratio=1.2, decay=0.9, max_norm=np.inf),
    dict(warmup_steps=3, max_ratio=1.0, decay=0.0, eps=1e-2),
    dict(warmup_steps=3, decay=1.0),
])
@pytest.mark.slow
def test_matches_float64_reference_step_by_step(kwargs):
  w = kwargs["warmup_steps"]
  # Spikes on the last warm-up step, on the first step after it, and later,
  # in one tensor at a time and in all at once.
  # A lasting rise of tensor 0 from step w + 20 on.
  spikes = {(w - 1, 0): 30.0, (w, 1): 50.0, (w + 5, 2): 10.0,
            (w + 9, 0): 4.0, (w + 9, 1): 4.0, (w + 9, 2): 4.0,
            (w + 12, 1): 0.01, **{(t, 0): 3.0 for t in range(w + 20, w + 40)}}
  norms = planted_norms(w + 40, spikes, seed=w)
  expected = reference(norms, **kwargs)
  updates, states = run_scan(oc.adagc(**kwargs), grads_with_norms(norms))
  np.testing.assert_allclose(stacked(states.stats.leaf_norms), norms, rtol=1e-5)
  np.testing.assert_allclose(states.stats.norm,
                             np.linalg.norm(norms, axis=1), rtol=1e-5)
  assert_matches(states, updates, expected)
  clipped = [bool(np.any(e.scale < 1)) for e in expected]
  np.testing.assert_array_equal(states.stats.clipped, clipped)
  assert int(states.stats.num_clipped[-1]) == sum(clipped)
  np.testing.assert_allclose(
      states.stats.frac_clipped, [np.mean(e.scale < 1) for e in expected])
  np.testing.assert_allclose(
      states.stats.scale, [np.min(e.scale) for e in expected], rtol=1e-5)
  assert states.stats.threshold is None


def test_warmup_boundary():
  # Steps 1..3 clip the global norm to max_norm and take the minimum;
  # step 4 is the first per-tensor step.
  norms = np.array([[3.0, 0.0001, 4.0], [0.3, 0.04, 0.4], [0.6, 0.02, 0.7],
                    [3.0, 0.05, 0.8]])
  tx = oc.adagc(1.05, decay=0.98, warmup_steps=3, max_norm=1.0)
  updates, states = run_scan(tx, grads_with_norms(norms))
  scale = stacked(states.leaf_scales)
  np.testing.assert_allclose(scale[0], 1 / np.linalg.norm(norms[0]),
                             rtol=1e-6)
  np.testing.assert_allclose(scale[1:3], 1.0)
  gamma = stacked(states.gamma)
  np.testing.assert_allclose(gamma[0], norms[0] / np.linalg.norm(norms[0]),
                             rtol=1e-6)
  np.testing.assert_allclose(
      gamma[2], [0.3, 0.0001 / np.linalg.norm(norms[0]), 0.4], rtol=1e-5)
  # Step 4: "a" is held to 1.05 * 0.3; "b" (0.05 vs ~2e-5) too; "c" passes.
  np.testing.assert_allclose(
      scale[3], [0.315 / 3.0, 1.05 * gamma[2, 1] / 0.05, 1.05 * 0.4 / 0.8],
      rtol=1e-5)
  np.testing.assert_allclose(stacked(states.leaf_thresholds)[2], 1.0)
  np.testing.assert_allclose(stacked(states.leaf_thresholds)[3],
                             1.05 * gamma[2], rtol=1e-6)
  assert [int(c) for c in states.stats.count] == [1, 2, 3, 4]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_steps_are_kept_out_of_gamma(bad):
  norms = planted_norms(30, {(15, 0): 20.0}, seed=3)
  norms[2, 1] = bad  # During warm-up: no gamma moves.
  norms[12, 2] = bad  # After warm-up: only that tensor's gamma stays.
  norms[20, :] = bad  # Every tensor.
  kwargs = dict(warmup_steps=6, max_norm=0.5)
  expected = reference(norms, **kwargs)
  updates, states = run_scan(oc.adagc(**kwargs), grads_with_norms(norms))
  gamma = stacked(states.gamma)
  assert np.all(np.isfinite(gamma))
  np.testing.assert_allclose(gamma, np.stack([e.gamma for e in expected]),
                             rtol=1e-5)
  np.testing.assert_array_equal(gamma[2], gamma[1])
  np.testing.assert_array_equal(gamma[12, 2], gamma[11, 2])
  assert gamma[12, 0] != gamma[11, 0]
  np.testing.assert_array_equal(gamma[20], gamma[19])
  # The bad tensors' updates stay non-finite; the others are clipped as usual.
  assert not np.all(np.isfinite(np.asarray(updates["c"][12])))
  assert np.all(np.isfinite(np.asarray(updates["a"][12])))
  ok = np.isfinite(norms).all(axis=1)
  np.testing.assert_allclose(stacked(states.leaf_scales)[ok],
                             np.stack([e.scale for e in expected])[ok],
                             rtol=1e-5)


def test_zero_gradient_in_warmup_zeroes_that_tensor():
  norms = np.array([[0.3, 0.0, 0.5]] + [[0.3, 0.1, 0.5]] * 4)
  updates, states = run_scan(oc.adagc(warmup_steps=2, follow=False),
                             grads_with_norms(norms))
  np.testing.assert_array_equal(np.asarray(states.gamma["b"]), 0.0)
  np.testing.assert_array_equal(np.asarray(updates["b"][2:]), 0.0)
  assert np.all(np.isfinite(stacked(states.leaf_scales)))


@pytest.mark.slow
def test_zero_gradient_in_warmup_following():
  # Zeroed at two steps, the second of which makes its norm gamma.
  norms = np.array([[0.3, 0.0, 0.5]] + [[0.3, 0.1, 0.5]] * 4)
  updates, states = run_scan(oc.adagc(warmup_steps=2),
                             grads_with_norms(norms))
  np.testing.assert_array_equal(np.asarray(updates["b"][2:4]), 0.0)
  np.testing.assert_allclose(np.asarray(states.gamma["b"][3:]), 0.1,
                             rtol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(updates["b"][4]), 0.1, rtol=1e-6)


@pytest.mark.parametrize(**JIT)
def test_step_by_step(jitted):
  norms = planted_norms(12, {(6, 2): 8.0, (3, 0): 5.0}, seed=5)
  kwargs = dict(warmup_steps=4, max_norm=0.7, max_ratio=1.1, decay=0.95)
  expected = reference(norms, **kwargs)
  tx = oc.adagc(**kwargs)
  grads = grads_with_norms(norms)
  update = maybe_jit(tx.update, jitted)
  state = tx.init(jax.tree.map(lambda x: x[0], grads))
  for t, e in enumerate(expected):
    updates, state = update(jax.tree.map(lambda x, t=t: x[t], grads), state)
    np.testing.assert_allclose(stacked(state.gamma), e.gamma, rtol=1e-5)
    np.testing.assert_allclose(
        [np.linalg.norm(updates[k]) for k in KEYS], e.clipped_norms,
        rtol=1e-5)


@pytest.mark.parametrize(**JIT)
def test_output_dtype_matches_input(jitted):
  g = {"h": jnp.ones(4, jnp.bfloat16), "f": jnp.ones(2, jnp.float32)}
  tx = oc.adagc(warmup_steps=1)
  update = maybe_jit(tx.update, jitted)
  state = tx.init(g)
  for _ in range(3):
    updates, state = update(g, state)
  chex.assert_trees_all_equal_dtypes(updates, g)
  assert state.gamma["h"].dtype == jnp.float32
  assert state.stats.norm.dtype == jnp.float32


def test_inject_hyperparams_matches_reference_and_can_change():
  norms = planted_norms(20, {(10, 1): 30.0}, seed=7)
  kwargs = dict(max_ratio=1.1, decay=0.9, warmup_steps=4, max_norm=0.6,
                eps=1e-3)
  expected = reference(norms, follow=False, **kwargs)
  tx = optax.inject_hyperparams(oc.adagc, static_args=("follow",))(
      follow=False, **kwargs)
  grads = grads_with_norms(norms)
  state = tx.init(jax.tree.map(lambda x: x[0], grads))
  update = jax.jit(tx.update)
  for t, e in enumerate(expected):
    updates, state = update(jax.tree.map(lambda x, t=t: x[t], grads), state)
    np.testing.assert_allclose(stacked(state.inner_state.gamma), e.gamma,
                               rtol=1e-5)
  # A new max_ratio and decay set in the state take effect at the next step.
  gamma = stacked(state.inner_state.gamma)
  state.hyperparams["max_ratio"] = jnp.asarray(0.5)
  state.hyperparams["decay"] = jnp.asarray(0.0)
  state.hyperparams["eps"] = jnp.asarray(0.0)
  updates, state = update(jax.tree.map(lambda x: x[0], grads), state)
  np.testing.assert_allclose(
      [np.linalg.norm(updates[k]) for k in KEYS],
      np.minimum(norms[0], 0.5 * gamma), rtol=1e-5)
  np.testing.assert_allclose(stacked(state.inner_state.gamma),
                             np.minimum(norms[0], 0.5 * gamma), rtol=1e-5)


def test_schedules():
  # max_norm falls to 0.25 after step 1; max_ratio is 2 from step 3 on.
  tx = oc.adagc(optax.piecewise_constant_schedule(1.0, {3: 2.0}),
                warmup_steps=2,
                max_norm=optax.piecewise_constant_schedule(2.0, {1: 0.25}))
  norms = np.array([[1.0, 1.0, 1.0]] * 2 + [[3.0, 3.0, 3.0]] * 2)
  updates, states = run_scan(tx, grads_with_norms(norms))
  threshold = stacked(states.leaf_thresholds)
  np.testing.assert_allclose(threshold[:2], [[2.0] * 3, [0.5] * 3])
  gamma = 0.5 / np.sqrt(3)
  np.testing.assert_allclose(threshold[2], gamma, rtol=1e-5)
  np.testing.assert_allclose(threshold[3], 2 * (0.98 * gamma + 0.02 * gamma),
                             rtol=1e-5)


def test_no_host_transfer_and_no_retrace():
  tx = oc.adagc(warmup_steps=3)
  traces = []

  @jax.jit
  def update(g, s):
    traces.append(1)
    return tx.update(g, s)

  g = jax.device_put(jax.tree.map(lambda x: x[0], grads_with_norms(
      np.ones((1, 3)))))
  state = jax.device_put(tx.init(g))
  updates, state = update(g, state)
  with jax.transfer_guard("disallow"):
    for _ in range(6):
      updates, state = update(g, state)
    jax.block_until_ready((updates, state))
  assert int(state.stats.count) == 7 and len(traces) == 1


def test_masked_and_none_leaves_pass_through():
  params = {"w": jnp.ones(3), "step": jnp.zeros((), jnp.int32), "n": None}
  tx = optax.masked(oc.adagc(warmup_steps=1, max_norm=1.0),
                    {"w": True, "step": False, "n": False})
  state = tx.init(params)
  grads = {"w": jnp.array([3.0, 4.0, 0.0]), "step": jnp.zeros((), jnp.int32),
           "n": None}
  updates, state = tx.update(grads, state, params)
  np.testing.assert_allclose(updates["w"], [0.6, 0.8, 0.0], rtol=1e-6)
  assert updates["step"].dtype == jnp.int32


def test_clip_stats_finds_the_state():
  opt = optax.chain(oc.adagc(warmup_steps=1), optax.sgd(0.1))
  params = {"w": jnp.ones(2)}
  state = opt.init(params)
  _, state = opt.update({"w": jnp.array([3.0, 4.0])}, state, params)
  stats = oc.clip_stats(state)
  assert set(stats) == {f"adagc/{k}" for k in (
      "count", "norm", "scale", "clipped", "num_clipped", "frac_clipped",
      "leaf_norms", "leaf_thresholds", "leaf_scales", "gamma")}
  np.testing.assert_allclose(stats["adagc/gamma"]["w"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(stats["adagc/norm"], 5.0, rtol=1e-6)
  np.testing.assert_allclose(stats["adagc/scale"], 0.2, rtol=1e-6)
  np.testing.assert_allclose(stats["adagc/leaf_norms"]["w"], 5.0,
                             rtol=1e-6)
  assert set(oc.clip_stats(state, scalars=True)) == {f"adagc/{k}" for k in (
      "count", "norm", "scale", "clipped", "num_clipped", "frac_clipped",
      "leaf_norms/w")}


@pytest.mark.slow
def test_shard_map_with_axis_name_matches_one_device():
  mesh = jax.make_mesh((8,), ("data",))
  rng = np.random.default_rng(11)
  steps = 8
  grads = {"w": rng.standard_normal((steps, 16, 8)).astype(np.float32),
           "b": rng.standard_normal((steps, 8)).astype(np.float32),
           "s": rng.standard_normal((steps,)).astype(np.float32)}
  grads["w"][5] *= 40.0
  specs = {"w": P(None, "data"), "b": P(None, "data"), "s": P()}
  make = lambda a: oc.adagc(warmup_steps=3, max_norm=2.0,  # noqa: E731
                            axis_name=a)
  want_u, want_s = run_scan(make(None), grads)

  def body(g):
    return run_scan(make("data"), g)

  fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(specs,),
                             out_specs=(specs, P())))
  sharded = {k: jax.device_put(v, jax.sharding.NamedSharding(mesh, specs[k]))
             for k, v in grads.items()}
  got_u, got_s = fn(sharded)
  chex.assert_trees_all_close(got_u, want_u, rtol=1e-5)
  chex.assert_trees_all_close(got_s.gamma, want_s.gamma, rtol=1e-5)
  chex.assert_trees_all_close(got_s.stats, want_s.stats, rtol=1e-5)
  assert int(np.sum(np.asarray(got_s.stats.clipped))) >= 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_ratio=0.0), "max_ratio"), (dict(decay=1.5), "decay"),
    (dict(decay=-0.1), "decay"), (dict(warmup_steps=0), "warmup_steps"),
    (dict(max_norm=-1.0), "max_norm"), (dict(eps=-1.0), "eps"),
    (dict(max_ratio=float("nan")), "max_ratio"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
  with pytest.raises(ValueError, match=match):
    oc.adagc(**kwargs)


@pytest.mark.parametrize("args, kwargs, match", [
    ((), dict(warmup_steps=2.5), "warmup_steps"),
    ((), dict(decay="x"), "decay"), ((), dict(max_norm="big"), "max_norm"),
    ((), dict(follow=1), "follow"),
    ((), dict(lambda_rel=1.1), r"lambda_rel= is now max_ratio="),
    ((), dict(beta=0.9), r"beta= is now decay="),
    ((), dict(lambda_abs=1.0), r"lambda_abs= is now max_norm="),
    ((1.05, 0.98), {}, "positional"),
])
def test_bad_arguments_raise_type_error(args, kwargs, match):
  with pytest.raises(TypeError, match=match):
    oc.adagc(*args, **kwargs)


def test_updates_unlike_inits_tree_raise_a_clear_error():
  tx = oc.adagc(warmup_steps=1)
  state = tx.init({"a": jnp.ones(3)})
  with pytest.raises(ValueError, match="gamma.*init"):
    tx.update({"a": jnp.ones(3), "b": jnp.ones(2)}, state)
  with pytest.raises(ValueError, match="gamma.*init"):
    tx.update({}, state)
  stacked_tx = oc.adagc(warmup_steps=1, layer_axis=0)
  state = stacked_tx.init({"a": jnp.ones((2, 3))})
  with pytest.raises(ValueError, match="layers"):
    stacked_tx.update({"a": jnp.ones((4, 3))}, state)
