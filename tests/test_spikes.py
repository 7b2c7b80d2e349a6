"""clip_spikes (SPAM's rule): float64 reference, both forms, edge cases, jit."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc
from tests import _references as ref

SHAPES = {"w": (4, 3), "b": (5,)}


def planted_grads(steps, seed=0, spikes=None):
  """Gradients near 1e-2 with planted element spikes; ``b[4]`` is 0 to step 6.

  ``spikes`` maps ``(step, key, flat index)`` to a factor.
  """
  rng = np.random.default_rng(seed)
  out = {k: 1e-2 * rng.standard_normal((steps,) + s) for k, s in SHAPES.items()}
  out["b"][:6, 4] = 0.0
  spikes = spikes or {(8, "w", 5): 1e3, (8, "b", 1): -300.0,
                      (15, "w", 0): 80.0, (6, "b", 4): 1.0,
                      (20, "b", 2): 1e4, (21, "b", 2): 1e4}
  for (t, k, i), f in spikes.items():
    if t >= steps:
      continue
    flat = out[k][t].reshape(-1)
    flat[i] *= f
    out[k][t] = flat.reshape(SHAPES[k])
  return out


def reference_steps(grads, **kwargs):
  steps = len(grads["w"])
  return {k: ref.spam_clip([grads[k][t] for t in range(steps)], **kwargs)
          for k in SHAPES}


def run_scan(tx, grads, params=None):
  grads = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grads)
  params = jax.tree.map(lambda x: x[0] * 0, grads) if params is None else params
  state = tx.init(params)

  def step(state, g):
    updates, state = tx.update(g, state, params)
    return state, (updates, state)

  _, out = jax.jit(lambda s, g: jax.lax.scan(step, s, g))(state, grads)
  return out


@pytest.mark.parametrize("theta, beta2", [(5000.0, 0.999), (50.0, 0.9),
                                          (4.0, 0.5), (0.0, 0.99)])
def test_standalone_matches_float64_reference(theta, beta2):
  grads = planted_grads(30, seed=int(theta) % 7)
  expected = reference_steps(grads, theta=theta, beta2=beta2)
  updates, states = run_scan(oc.clip_spikes(theta, beta2=beta2), grads)
  for k in SHAPES:
    np.testing.assert_allclose(updates[k], [e[0] for e in expected[k]],
                               rtol=2e-5, atol=1e-30, err_msg=k)
    # 1 - float32(0.999) is 1e-3 to 5e-5 relative: nu drifts by that much.
    np.testing.assert_allclose(states.nu[k], [e[2] for e in expected[k]],
                               rtol=1e-4, atol=1e-30, err_msg=k)
  masks = [sum(int(expected[k][t][1].sum()) for k in SHAPES)
           for t in range(30)]
  np.testing.assert_array_equal(states.stats.num_spikes, masks)
  assert int(states.stats.num_clipped[-1]) == sum(m > 0 for m in masks)
  np.testing.assert_allclose(states.stats.frac_clipped,
                             np.asarray(masks) / 17, rtol=1e-6)
  np.testing.assert_array_equal(states.stats.clipped, np.asarray(masks) > 0)
  np.testing.assert_allclose(
      states.stats.grad_norm,
      [np.sqrt(sum(np.sum(grads[k][t] ** 2) for k in SHAPES))
       for t in range(30)], rtol=1e-5)
  if theta == 5000.0:  # The planted 1000x and 300x spikes are caught.
    assert masks[8] == 2 and masks[20] == 1
    assert masks[0] == 0  # The first step: v = 0, nothing clipped.


def test_first_step_and_first_nonzero_element_pass():
  grads = planted_grads(8)
  updates, states = run_scan(oc.clip_spikes(1.0, beta2=0.9), grads)
  np.testing.assert_allclose(updates["w"][0], grads["w"][0], rtol=1e-6)
  # b[4] was 0 for six steps; its first nonzero value is not clipped to 0.
  np.testing.assert_allclose(updates["b"][6, 4], grads["b"][6, 4], rtol=1e-6)
  assert float(states.nu["b"][6, 4]) > 0


def test_nonfinite_elements():
  g0 = {"w": jnp.full((4, 3), 0.1), "b": jnp.full((5,), 0.1)}
  tx = oc.clip_spikes(100.0, beta2=0.9)
  update = jax.jit(tx.update)
  _, state = update(g0, tx.init(g0))
  bad = {"w": g0["w"].at[0, 0].set(jnp.inf).at[1, 1].set(-jnp.inf),
         "b": g0["b"].at[2].set(jnp.nan)}
  updates, state2 = update(bad, state)
  bound = np.sqrt(100.0 * 0.1 * 0.01)
  np.testing.assert_allclose(updates["w"][0, 0], bound, rtol=1e-6)
  np.testing.assert_allclose(updates["w"][1, 1], -bound, rtol=1e-6)
  assert np.isnan(updates["b"][2])
  assert int(state2.stats.num_spikes) == 2
  np.testing.assert_array_equal(state2.nu["b"][2], state.nu["b"][2])
  assert np.all(np.isfinite(np.asarray(state2.nu["w"])))


def test_theta_inf_clips_nothing():
  grads = planted_grads(12)
  updates, states = run_scan(oc.clip_spikes(np.inf), grads)
  chex.assert_trees_all_close(updates, jax.tree.map(jnp.float32, grads))
  assert int(states.stats.num_clipped[-1]) == 0


# The wrapper: the same rule against the inner optimizer's own nu.


def adam_reference(grads, theta, lr, b1, b2, eps):
  """Adam (optax's form) fed SPAM-clipped gradients, in float64."""
  m = v = None
  out, nus = [], []
  for t, g in enumerate(grads, start=1):
    g = np.asarray(g, np.float64)
    if m is None:
      m, v = np.zeros_like(g), np.zeros_like(g)
    c, _ = ref.spike_rule(g, v, theta)
    m = b1 * m + (1 - b1) * c
    v = b2 * v + (1 - b2) * c * c
    mhat, vhat = m / (1 - b1 ** t), v / (1 - b2 ** t)
    out.append(-lr * mhat / (np.sqrt(vhat) + eps))
    nus.append(v.copy())
  return out, nus


@pytest.mark.parametrize("theta", [5000.0, 20.0])
def test_wrapper_matches_float64_adam_reference(theta):
  grads = planted_grads(25, seed=3)
  tx = oc.clip_spikes(theta, inner=optax.adam(1e-2, b1=0.9, b2=0.95,
                                              eps=1e-8))
  updates, states = run_scan(tx, grads)
  for k in SHAPES:
    want, nus = adam_reference([grads[k][t] for t in range(25)], theta, 1e-2,
                               0.9, 0.95, 1e-8)
    np.testing.assert_allclose(updates[k], want, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(states.inner_state[0].nu[k], nus, rtol=1e-5,
                               atol=1e-30)
  assert int(states.stats.num_clipped[-1]) >= 2


def test_wrapper_equals_standalone_chained_with_adam():
  grads = planted_grads(25, seed=4)
  wrapped = oc.clip_spikes(30.0, inner=optax.adamw(1e-2, b2=0.95))
  chained = optax.chain(oc.clip_spikes(30.0, beta2=0.95),
                        optax.adamw(1e-2, b2=0.95))
  uw, sw = run_scan(wrapped, grads)
  uc, sc = run_scan(chained, grads)
  chex.assert_trees_all_close(uw, uc, rtol=1e-5, atol=1e-12)
  np.testing.assert_array_equal(sw.stats.num_spikes, sc[0].stats.num_spikes)
  assert int(sw.stats.num_clipped[-1]) > 0


def test_wrapper_keeps_no_parameter_sized_buffer():
  params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
  adam_state = optax.adam(1e-3).init(params)
  wrapped = oc.clip_spikes(inner=optax.adam(1e-3)).init(params)
  standalone = oc.clip_spikes().init(params)
  size = lambda t: sum(x.size for x in jax.tree.leaves(t))  # noqa: E731
  assert size(wrapped) == size(adam_state) + size(wrapped.stats)
  assert all(x.shape == () for x in jax.tree.leaves(wrapped.stats))
  assert size(standalone) == size(params) + size(standalone.stats)


def test_wrapper_finds_nu_inside_chain_and_inject_hyperparams():
  params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
  inner = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2, b2=0.9)
  tx = oc.clip_spikes(10.0, inner=optax.chain(optax.clip(1.0), inner))
  state = tx.init(params)
  grads = jax.tree.map(jnp.float32, planted_grads(10))
  update = jax.jit(tx.update)
  for t in range(10):
    _, state = update(jax.tree.map(lambda x, t=t: x[t], grads), state, params)
  assert int(state.stats.num_clipped) >= 1


def test_wrapper_without_nu_raises():
  with pytest.raises(ValueError, match="nu"):
    oc.clip_spikes(inner=optax.sgd(0.1)).init({"w": jnp.zeros(2)})


def test_wrapper_passes_extra_args():
  tx = oc.clip_spikes(inner=optax.chain(
      optax.adam(1e-2), optax.contrib.reduce_on_plateau()))
  params = {"w": jnp.ones(2)}
  state = tx.init(params)
  _, state = tx.update({"w": jnp.ones(2)}, state, params, value=jnp.ones(()))
  assert int(state.stats.count) == 1


class VariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_standalone_step_by_step(self):
    grads = planted_grads(12, seed=9)
    expected = reference_steps(grads, theta=50.0, beta2=0.9)
    tx = oc.clip_spikes(50.0, beta2=0.9)
    update = self.variant(tx.update)
    state = tx.init(jax.tree.map(lambda x: jnp.float32(x[0]), grads))
    for t in range(12):
      g = jax.tree.map(lambda x, t=t: jnp.float32(x[t]), grads)
      updates, state = update(g, state)
      for k in SHAPES:
        np.testing.assert_allclose(updates[k], expected[k][t][0], rtol=2e-5,
                                   atol=1e-30)

  @chex.variants(with_jit=True, without_jit=True)
  def test_output_dtype_matches_input(self):
    g = {"h": jnp.ones(4, jnp.bfloat16), "f": jnp.ones(2, jnp.float32)}
    for tx in (oc.clip_spikes(), oc.clip_spikes(inner=optax.adam(1e-3))):
      state = tx.init(g)
      updates, state = self.variant(tx.update)(g, state, g)
      chex.assert_trees_all_equal_dtypes(updates, g)


def test_inject_hyperparams():
  grads = planted_grads(20, seed=5)
  expected = reference_steps(grads, theta=50.0, beta2=0.9)
  tx = optax.inject_hyperparams(oc.clip_spikes)(theta=50.0, beta2=0.9)
  state = tx.init(jax.tree.map(lambda x: jnp.float32(x[0]), grads))
  update = jax.jit(tx.update)
  for t in range(20):
    updates, state = update(jax.tree.map(lambda x, t=t: jnp.float32(x[t]),
                                         grads), state)
    np.testing.assert_allclose(updates["w"], expected["w"][t][0], rtol=2e-5,
                               atol=1e-30)
  # theta = 0 set in the state: every nonzero element (v > 0) goes to zero;
  # b[4] of step 0 is 0.
  state.hyperparams["theta"] = jnp.asarray(0.0)
  updates, state = update(jax.tree.map(lambda x: jnp.float32(x[0]), grads),
                          state)
  np.testing.assert_array_equal(updates["w"], 0.0)
  assert int(state.inner_state.stats.num_spikes) == 16


def test_schedule_theta():
  sched = optax.piecewise_constant_schedule(1e9, {3: 1e-9})
  tx = oc.clip_spikes(sched, beta2=0.9)
  grads = planted_grads(5)
  _, states = run_scan(tx, grads)
  np.testing.assert_array_equal(np.asarray(states.stats.num_spikes) > 0,
                                [False, False, False, True, True])


def test_no_host_transfer_under_jit():
  params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
  for tx in (oc.clip_spikes(), oc.clip_spikes(inner=optax.adam(1e-3))):
    update = jax.jit(tx.update)
    g = jax.device_put(jax.tree.map(jnp.ones_like, params))
    state = jax.device_put(tx.init(params))
    updates, state = update(g, state, params)
    with jax.transfer_guard("disallow"):
      for _ in range(3):
        updates, state = update(g, state, params)
      jax.block_until_ready((updates, state))
    assert int(state.stats.count) == 4


def test_clip_stats_finds_the_statistics():
  opt = oc.clip_spikes(2000.0, inner=optax.adam(0.1))
  params = {"w": jnp.zeros(2)}
  state = opt.init(params)
  for g in ([1.0, 1.0], [1.0, 100.0]):
    _, state = opt.update({"w": jnp.array(g)}, state, params)
  stats = oc.clip_stats(state)
  spikes = [v for k, v in stats.items() if k.endswith("num_spikes")]
  assert [int(s) for s in spikes] == [1]


@pytest.mark.parametrize("kwargs, match", [
    (dict(theta=-1.0), "theta"), (dict(theta=float("nan")), "theta"),
    (dict(beta2=1.0), "beta2"), (dict(beta2=-0.5), "beta2"),
    (dict(beta2=0.9, inner=optax.adam(1e-3)), "beta2"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
  with pytest.raises(ValueError, match=match):
    oc.clip_spikes(**kwargs)


def test_bad_argument_types_raise_type_error():
  with pytest.raises(TypeError, match="inner"):
    oc.clip_spikes(inner=lambda g: g)
  with pytest.raises(TypeError, match="theta"):
    oc.clip_spikes(theta="big")
  with pytest.raises(TypeError, match="complex"):
    oc.clip_spikes().init({"w": jnp.zeros(2, jnp.complex64)})


@pytest.mark.slow
def test_orbax_round_trip_continues_bit_identically(tmp_path):
  # AdaGC and both forms of spike clipping in one optimizer: save mid-run,
  # restore into a fresh state, continue; same bytes as never stopping.
  ocp = pytest.importorskip("orbax.checkpoint")
  opt = optax.chain(
      oc.adagc(warmup_steps=3),
      oc.clip_spikes(50.0, beta2=0.9),
      oc.clip_spikes(20.0, inner=optax.adamw(1e-2, b2=0.9)))
  grads = jax.tree.map(jnp.float32, planted_grads(14, seed=2))
  params = {k: jnp.ones(s) for k, s in SHAPES.items()}

  @jax.jit
  def step(params, state, g):
    updates, state = opt.update(g, state, params)
    return optax.apply_updates(params, updates), state

  def run(params, state, first, last):
    for t in range(first, last):
      params, state = step(params, state,
                           jax.tree.map(lambda x, t=t: x[t], grads))
    return params, state

  mid = run(params, opt.init(params), 0, 7)
  path = tmp_path / "ckpt"
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, {"params": mid[0], "state": mid[1]})
  want = run(*mid, 7, 14)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                          {"params": params, "state": opt.init(params)})
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(path, abstract)
  got = run(restored["params"], restored["state"], 7, 14)
  assert int(want[1][2].stats.num_clipped) > 0
  assert int(want[1][0].num_clipped) > 0
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    assert np.asarray(a).dtype == np.asarray(b).dtype
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
