"""clip_spikes and spike_clipped (SPAM's rule): float64 references, both
forms, edge cases, jit."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import optaxclip as oc
from tests import _helpers as helpers
from tests import _references as ref

SHAPES = {"w": (4, 3), "b": (5,)}
STEPS = 30  # Every run of the standalone form below has this many steps.


def planted_grads(steps=STEPS, seed=0, spikes=None):
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


def f32(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def zeros():
  return {k: jnp.zeros(s) for k, s in SHAPES.items()}


def reference_steps(grads, max_ratio, decay):
  steps = len(grads["w"])
  return {k: ref.spam_clip([grads[k][t] for t in range(steps)],
                           theta=max_ratio, beta2=decay) for k in SHAPES}


@jax.jit
def run_standalone(grads, max_ratio, decay):
  """Every step of clip_spikes(max_ratio, decay=decay) over ``grads``; the
  hyper-parameters are traced, so one compilation serves every value."""
  return helpers.run_scan(oc.clip_spikes(max_ratio, decay=decay), grads,
                          zeros())


@pytest.mark.parametrize("max_ratio, decay", [(5000.0, 0.999), (50.0, 0.9),
                                              (4.0, 0.5), (0.0, 0.99)])
def test_standalone_matches_float64_reference(max_ratio, decay):
  grads = planted_grads(seed=int(max_ratio) % 7)
  expected = reference_steps(grads, max_ratio, decay)
  updates, states = run_standalone(f32(grads), max_ratio, decay)
  for k in SHAPES:
    np.testing.assert_allclose(updates[k], [e[0] for e in expected[k]],
                               rtol=2e-5, atol=1e-30, err_msg=k)
    # 1 - float32(0.999) is 1e-3 to 5e-5 relative: nu drifts by that much.
    np.testing.assert_allclose(states.nu[k], [e[2] for e in expected[k]],
                               rtol=1e-4, atol=1e-30, err_msg=k)
  masks = [sum(int(expected[k][t][1].sum()) for k in SHAPES)
           for t in range(STEPS)]
  np.testing.assert_array_equal(states.num_spikes, masks)
  stats = states.stats
  assert int(stats.num_clipped[-1]) == sum(m > 0 for m in masks)
  np.testing.assert_allclose(stats.frac_clipped, np.asarray(masks) / 17,
                             rtol=1e-6)
  np.testing.assert_array_equal(stats.clipped, np.asarray(masks) > 0)
  np.testing.assert_array_equal(stats.count, np.arange(1, STEPS + 1))
  np.testing.assert_allclose(
      stats.norm, [helpers.np_norm({k: grads[k][t] for k in SHAPES})
                   for t in range(STEPS)], rtol=1e-5)
  assert stats.threshold is None and stats.scale is None  # Per element.
  if max_ratio == 5000.0:  # The planted 1000x and 300x spikes are caught.
    assert masks[8] == 2 and masks[20] == 1
    assert masks[0] == 0  # The first step: v = 0, nothing clipped.


def test_first_step_and_first_nonzero_element_pass():
  grads = planted_grads()
  updates, states = run_standalone(f32(grads), 1.0, 0.9)
  assert int(states.num_spikes[1]) > 0  # max_ratio = 1 clips from step 1.
  np.testing.assert_allclose(updates["w"][0], grads["w"][0], rtol=1e-6)
  # b[4] was 0 for six steps; its first nonzero value is not clipped to 0.
  np.testing.assert_allclose(updates["b"][6, 4], grads["b"][6, 4], rtol=1e-6)
  assert float(states.nu["b"][6, 4]) > 0


def test_max_ratio_inf_clips_nothing():
  grads = planted_grads()
  updates, states = run_standalone(f32(grads), np.inf, 0.999)
  chex.assert_trees_all_close(updates, f32(grads))
  assert int(states.stats.num_clipped[-1]) == 0


@jax.jit
def _one_step(g, v, max_ratio):
  tx = oc.clip_spikes(max_ratio, decay=0.9)
  state = tx.init(g)._replace(nu=v)
  return tx.update(g, state)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, width=32), min_size=6, max_size=6),
       st.lists(st.sampled_from([0.0, 1e-4, 0.5, 2.0, 1e4]), min_size=6,
                max_size=6),
       st.sampled_from([0.0, 1.0, 4.0, 5000.0, np.inf]))
def test_the_rule_matches_numpy(g, v, max_ratio):
  g, v = np.asarray(g, np.float32), np.asarray(v, np.float32)
  # Not on the boundary g**2 = max_ratio * v, where float32 rounding decides.
  g2, bound = np.float64(g[v > 0]) ** 2, max_ratio * np.float64(v[v > 0])
  assume(not np.any(np.abs(g2 - bound) <= 1e-5 * bound))
  # Nor where g**2 underflows float32, which the rule squares in.
  assume(not np.any((g2 > 0) & (g2 < np.finfo(np.float32).tiny)))
  want, mask = ref.spike_rule(g, v, max_ratio)
  got, state = _one_step(jnp.asarray(g), jnp.asarray(v),
                         jnp.float32(max_ratio))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert int(state.num_spikes) == int(mask.sum())
  np.testing.assert_allclose(state.stats.frac_clipped, mask.mean(), rtol=1e-6)


def test_nonfinite_elements():
  g0 = {"w": jnp.full((4, 3), 0.1), "b": jnp.full((5,), 0.1)}
  tx = oc.clip_spikes(100.0, decay=0.9)
  update = jax.jit(tx.update)
  _, state = update(g0, tx.init(g0))
  bad = {"w": g0["w"].at[0, 0].set(jnp.inf).at[1, 1].set(-jnp.inf),
         "b": g0["b"].at[2].set(jnp.nan)}
  updates, state2 = update(bad, state)
  bound = np.sqrt(100.0 * 0.1 * 0.01)
  np.testing.assert_allclose(updates["w"][0, 0], bound, rtol=1e-6)
  np.testing.assert_allclose(updates["w"][1, 1], -bound, rtol=1e-6)
  assert np.isnan(updates["b"][2])
  assert int(state2.num_spikes) == 2
  np.testing.assert_array_equal(state2.nu["b"][2], state.nu["b"][2])
  assert np.all(np.isfinite(np.asarray(state2.nu["w"])))


@pytest.mark.parametrize(**helpers.JIT)
def test_standalone_step_by_step(jitted):
  grads = planted_grads(12, seed=9)
  expected = reference_steps(grads, 50.0, 0.9)
  tx = oc.clip_spikes(50.0, decay=0.9)
  update = helpers.maybe_jit(tx.update, jitted)
  state = tx.init(f32(jax.tree.map(lambda x: x[0], grads)))
  for t in range(12):
    updates, state = update(f32(jax.tree.map(lambda x, t=t: x[t], grads)),
                            state)
    for k in SHAPES:
      np.testing.assert_allclose(updates[k], expected[k][t][0], rtol=2e-5,
                                 atol=1e-30)


# The wrapper: the same rule against the inner optimizer's own nu.


def adam_reference(grads, max_ratio, lr, b1, b2, eps):
  """Adam (optax's form) fed SPAM-clipped gradients, in float64."""
  m = v = None
  out, nus = [], []
  for t, g in enumerate(grads, start=1):
    g = np.asarray(g, np.float64)
    if m is None:
      m, v = np.zeros_like(g), np.zeros_like(g)
    c, _ = ref.spike_rule(g, v, max_ratio)
    m = b1 * m + (1 - b1) * c
    v = b2 * v + (1 - b2) * c * c
    mhat, vhat = m / (1 - b1 ** t), v / (1 - b2 ** t)
    out.append(-lr * mhat / (np.sqrt(vhat) + eps))
    nus.append(v.copy())
  return out, nus


@jax.jit
def run_wrapped_adam(grads, max_ratio):
  """spike_clipped(adam) over ``grads``, ``max_ratio`` traced."""
  tx = oc.spike_clipped(optax.adam(1e-2, b1=0.9, b2=0.95, eps=1e-8),
                        max_ratio=max_ratio)
  return helpers.run_scan(tx, grads, zeros())


@pytest.mark.parametrize("max_ratio", [5000.0, 20.0])
def test_wrapper_matches_float64_adam_reference(max_ratio):
  grads = planted_grads(seed=3)
  updates, states = run_wrapped_adam(f32(grads), max_ratio)
  for k in SHAPES:
    want, nus = adam_reference([grads[k][t] for t in range(STEPS)],
                               max_ratio, 1e-2, 0.9, 0.95, 1e-8)
    np.testing.assert_allclose(updates[k], want, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(states.inner_state[0].nu[k], nus, rtol=1e-5,
                               atol=1e-30)
  assert int(states.stats.num_clipped[-1]) >= 2
  np.testing.assert_array_equal(states.stats.clipped, states.num_spikes > 0)


def test_wrapper_equals_standalone_chained_with_adam():
  grads = f32(planted_grads(25, seed=4))
  wrapped = oc.spike_clipped(optax.adamw(1e-2, b2=0.95), max_ratio=30.0)
  chained = optax.chain(oc.clip_spikes(30.0, decay=0.95),
                        optax.adamw(1e-2, b2=0.95))
  uw, sw = helpers.run_scan(wrapped, grads, zeros())
  uc, sc = helpers.run_scan(chained, grads, zeros())
  chex.assert_trees_all_close(uw, uc, rtol=1e-5, atol=1e-12)
  np.testing.assert_array_equal(sw.num_spikes, sc[0].num_spikes)
  chex.assert_trees_all_close(sw.stats, sc[0].stats, rtol=1e-6)
  assert int(sw.stats.num_clipped[-1]) > 0


def test_wrapper_keeps_no_parameter_sized_buffer():
  params = zeros()
  adam_state = optax.adam(1e-3).init(params)
  wrapped = oc.spike_clipped(optax.adam(1e-3)).init(params)
  standalone = oc.clip_spikes().init(params)
  size = lambda t: sum(x.size for x in jax.tree.leaves(t))  # noqa: E731
  assert size(wrapped) == size(adam_state) + size(wrapped.stats) + 1
  assert all(x.shape == () for x in jax.tree.leaves(wrapped.stats))
  assert size(standalone) == size(params) + size(standalone.stats) + 1


def test_wrapper_finds_nu_inside_chain_and_inject_hyperparams():
  params = zeros()
  inner = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2, b2=0.9)
  tx = oc.spike_clipped(optax.chain(optax.clip(1.0), inner), max_ratio=10.0)
  _, states = helpers.run_scan(tx, f32(planted_grads(10)), params)
  assert int(states.stats.num_clipped[-1]) >= 1


def test_wrapper_passes_extra_args():
  tx = oc.spike_clipped(optax.chain(
      optax.adam(1e-2), optax.contrib.reduce_on_plateau()))
  params = {"w": jnp.ones(2)}
  state = tx.init(params)
  _, state = tx.update({"w": jnp.ones(2)}, state, params, value=jnp.ones(()))
  assert int(state.stats.count) == 1


@pytest.mark.parametrize(**helpers.JIT)
def test_output_dtype_matches_input(jitted):
  g = {"h": jnp.ones(4, jnp.bfloat16), "f": jnp.ones(2, jnp.float32)}
  for tx in (oc.clip_spikes(), oc.spike_clipped(optax.adam(1e-3))):
    state = tx.init(g)
    updates, state = helpers.maybe_jit(tx.update, jitted)(g, state, g)
    chex.assert_trees_all_equal_dtypes(updates, g)
    assert state.stats.norm.dtype == jnp.float32


def test_inject_hyperparams():
  grads = planted_grads(20, seed=5)
  expected = reference_steps(grads, 50.0, 0.9)
  tx = optax.inject_hyperparams(oc.clip_spikes)(max_ratio=50.0, decay=0.9)
  updates, states = helpers.run_scan(tx, f32(grads), zeros())
  np.testing.assert_allclose(updates["w"], [e[0] for e in expected["w"]],
                             rtol=2e-5, atol=1e-30)
  # max_ratio = 0 set in the state: every nonzero element (v > 0) goes to
  # zero; b[4] of step 0 is 0.
  state = jax.tree.map(lambda x: x[-1], states)
  state.hyperparams["max_ratio"] = jnp.asarray(0.0)
  updates, state = jax.jit(tx.update)(f32(jax.tree.map(lambda x: x[0],
                                                       grads)), state)
  np.testing.assert_array_equal(updates["w"], 0.0)
  assert int(state.inner_state.num_spikes) == 16


def test_schedule_max_ratio():
  sched = optax.piecewise_constant_schedule(1e9, {3: 1e-9})
  tx = oc.clip_spikes(sched, decay=0.9)
  _, states = helpers.run_scan(tx, f32(planted_grads(5)))
  np.testing.assert_array_equal(np.asarray(states.num_spikes) > 0,
                                [False, False, False, True, True])


def test_no_host_transfer_under_jit():
  params = zeros()
  for tx in (oc.clip_spikes(), oc.spike_clipped(optax.adam(1e-3))):
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
  params = {"w": jnp.zeros(2)}
  states = []
  for opt in (optax.chain(oc.clip_spikes(2000.0), optax.adam(0.1)),
              oc.spike_clipped(optax.adam(0.1), max_ratio=2000.0)):
    state = opt.init(params)
    for g in ([1.0, 1.0], [1.0, 100.0]):
      _, state = opt.update({"w": jnp.array(g)}, state, params)
    states.append(state)
  stats = oc.clip_stats(states, scalars=True)
  for name in ("clip_spikes", "spike_clipped"):
    assert int(stats[f"{name}/num_spikes"]) == 1
    assert int(stats[f"{name}/num_clipped"]) == 1
    assert int(stats[f"{name}/count"]) == 2
    np.testing.assert_allclose(stats[f"{name}/norm"], np.hypot(1.0, 100.0),
                               rtol=1e-6)
    np.testing.assert_allclose(stats[f"{name}/frac_clipped"], 0.5)
    assert f"{name}/threshold" not in stats and f"{name}/scale" not in stats
  assert "clip_spikes/nu" not in stats  # A buffer, not a scalar.


@pytest.mark.parametrize("build, match", [
    (lambda: oc.clip_spikes(-1.0), "max_ratio"),
    (lambda: oc.clip_spikes(float("nan")), "max_ratio"),
    (lambda: oc.clip_spikes(decay=1.0), "decay"),
    (lambda: oc.clip_spikes(decay=-0.5), "decay"),
    (lambda: oc.spike_clipped(optax.adam(1e-3), max_ratio=-1.0), "max_ratio"),
    (lambda: oc.spike_clipped(optax.sgd(0.1)).init({"w": jnp.zeros(2)}),
     "nu"),
])
def test_bad_arguments_raise_value_error(build, match):
  with pytest.raises(ValueError, match=match):
    build()


@pytest.mark.parametrize("build, match", [
    (lambda: oc.spike_clipped(lambda g: g), "inner"),
    (lambda: oc.clip_spikes("big"), "max_ratio"),
    (lambda: oc.clip_spikes().init({"w": jnp.zeros(2, jnp.complex64)}),
     "complex"),
    (lambda: oc.spike_clipped(optax.adam(1e-3)).init(
        {"w": jnp.zeros(2, jnp.complex64)}), "complex"),
    # Keywords of earlier releases name their replacement.
    (lambda: oc.clip_spikes(theta=50.0), "max_ratio="),
    (lambda: oc.clip_spikes(beta2=0.9), "decay="),
    (lambda: oc.clip_spikes(inner=optax.adam(1e-3)), "spike_clipped"),
    (lambda: oc.clip_spikes(50.0, inner=optax.adam(1e-3)), "spike_clipped"),
    (lambda: oc.spike_clipped(optax.adam(1e-3), theta=50.0), "max_ratio="),
    (lambda: oc.spike_clipped(optax.adam(1e-3), beta2=0.9), "b2"),
])
def test_bad_arguments_raise_type_error(build, match):
  with pytest.raises(TypeError, match=match):
    build()


@pytest.mark.slow
def test_orbax_round_trip_continues_bit_identically(tmp_path):
  # AdaGC and both forms of spike clipping in one optimizer: save mid-run,
  # restore into a fresh state, continue; same bytes as never stopping.
  ocp = pytest.importorskip("orbax.checkpoint")
  opt = optax.chain(
      oc.adagc(warmup_steps=3),
      oc.clip_spikes(50.0, decay=0.9),
      oc.spike_clipped(optax.adamw(1e-2, b2=0.9), max_ratio=20.0))
  grads = f32(planted_grads(14, seed=2))
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
  stats = oc.clip_stats(want[1])
  assert int(stats["spike_clipped/num_clipped"]) > 0
  assert int(stats["adagc/num_clipped"]) > 0
  assert type(restored["state"][2]) is oc.SpikeClippedState
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    assert np.asarray(a).dtype == np.asarray(b).dtype
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
