"""Update clipping: StableAdamW's rule (clip_update_rms) against float64
NumPy and torch-optimi, and the historical update-norm clip
(clip_update_by_history) against float64 NumPy transcriptions."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optaxclip as oc
from tests import _helpers as helpers

SHAPES = {"w": (6, 4), "b": (4,), "s": ()}
LR, B1, B2, EPS, WD = 1e-2, 0.9, 0.99, 1e-6, 1e-2


def planted_grads(steps, seed=0):
  """Gradients near 1, with spikes that push some tensors' RMS above 1."""
  rng = np.random.default_rng(seed)
  out = {k: rng.standard_normal((steps,) + s) for k, s in SHAPES.items()}
  out["w"][4] *= 30.0  # A tensor-wide spike.
  out["b"][7, 1] = 200.0  # One element.
  out["s"][9] = -50.0
  out["b"][2] = 0.0  # A zero gradient.
  return out


# ----------------------------------------------------------------------------
# StableAdamW: the rule as published, in float64, in a plain loop.


def stable_adamw_reference(grads, params, steps, lr=LR, b1=B1, b2=B2,
                           eps=EPS, wd=WD):
  """Wortsman et al. 2023, Algorithm 2 (AdamW with update clipping), per
  tensor: u = sqrt(mean(g^2 / max(v_hat, eps^2))) with v_hat the
  bias-corrected second moment including this step's g, and the learning
  rate (weight decay included) divided by max(1, u).

  Returns the parameters after each step and each step's u, per tensor.
  """
  out = {k: [] for k in params}
  us = {k: [] for k in params}
  for k, p in params.items():
    p = np.array(p, np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t in range(1, steps + 1):
      g = np.asarray(grads[k][t - 1], np.float64)
      m = b1 * m + (1 - b1) * g
      v = b2 * v + (1 - b2) * g * g
      mhat = m / (1 - b1 ** t)
      vhat = v / (1 - b2 ** t)
      u = math.sqrt(np.mean(g * g / np.maximum(vhat, eps * eps)))
      lr_t = lr / max(1.0, u)
      p = p - lr_t * (mhat / (np.sqrt(vhat) + eps) + wd * p)
      out[k].append(p.copy())
      us[k].append(u)
  return out, us


def initial_params():
  rng = np.random.default_rng(7)
  return {k: rng.standard_normal(s) for k, s in SHAPES.items()}


def stable_adamw_jax(steps, grads, params, **kwargs):
  """Parameters after each step and the states, JAX in float64: adamw
  wrapped, its b2 and eps read off it."""
  tx = oc.clip_update_rms(
      optax.adamw(LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD),
      leaf_norms=True, **kwargs)
  params = jax.tree.map(jnp.float64, params)
  grads = jax.tree.map(jnp.float64, grads)

  def step(carry, g):
    p, s = carry
    u, s = tx.update(g, s, p)
    p = optax.apply_updates(p, u)
    return (p, s), (p, s)

  _, (ps, states) = jax.jit(lambda c, g: jax.lax.scan(step, c, g))(
      (params, tx.init(params)), grads)
  return ps, states


def test_stable_adamw_matches_float64_transcription():
  steps = 14
  grads, params = planted_grads(steps), initial_params()
  want, us = stable_adamw_reference(grads, params, steps)
  with jax.enable_x64(True):
    got, states = stable_adamw_jax(steps, grads, params)
    for k in SHAPES:
      np.testing.assert_allclose(got[k], np.stack(want[k]), rtol=1e-12,
                                 atol=1e-14, err_msg=k)
      np.testing.assert_allclose(states.stats.leaf_norms[k], us[k],
                                 rtol=1e-12, err_msg=k)
  clipped = {k: np.asarray(us[k]) > 1 for k in SHAPES}
  # The planted spikes clip (w at step 4, b at 7, s at 9), and not every step.
  assert clipped["w"][4] and clipped["b"][7] and clipped["s"][9]
  assert not clipped["w"][5] and not clipped["s"][3]
  assert us["b"][2] == 0.0  # A zero gradient.
  num = sum(clipped[k].astype(int) for k in SHAPES)
  np.testing.assert_array_equal(states.num_leaves_clipped, num)
  np.testing.assert_array_equal(states.stats.clipped, num > 0)
  np.testing.assert_array_equal(states.stats.num_clipped, np.cumsum(num > 0))
  np.testing.assert_allclose(states.stats.frac_clipped, num / len(SHAPES))
  largest = np.max([us[k] for k in SHAPES], axis=0)
  np.testing.assert_allclose(states.largest_rms, largest, rtol=1e-12)
  np.testing.assert_allclose(states.stats.scale,
                             1 / np.maximum(1, largest), rtol=1e-12)
  assert states.stats.norm is None and states.stats.threshold is None


def test_stable_adamw_matches_torch_optimi():
  torch = pytest.importorskip(
      "torch", reason="torch and torch-optimi (the `reference` extra) are"
      " not installed")
  optimi = pytest.importorskip(
      "optimi", reason="torch-optimi (the `reference` extra) is not"
      " installed")
  steps = 14
  grads, params = planted_grads(steps), initial_params()
  tensors = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True)
             for k, v in params.items()}
  with jax.enable_x64(True):
    got, _ = stable_adamw_jax(steps, grads, params)
    got = jax.device_get(got)
  for foreach in (False, True):
    ts = {k: v.detach().clone().requires_grad_(True)
          for k, v in tensors.items()}
    opt = optimi.StableAdamW(list(ts.values()), lr=LR, betas=(B1, B2),
                             weight_decay=WD, eps=EPS, foreach=foreach,
                             triton=False)
    theirs = {k: [] for k in SHAPES}
    for t in range(steps):
      for k, p in ts.items():
        p.grad = torch.tensor(grads[k][t], dtype=torch.float64)
      opt.step()
      for k, p in ts.items():
        theirs[k].append(p.detach().numpy().copy())
    for k in SHAPES:
      np.testing.assert_allclose(got[k], np.stack(theirs[k]), rtol=1e-10,
                                 atol=1e-13, err_msg=f"{k} {foreach=}")
  want, _ = stable_adamw_reference(grads, params, steps)
  for k in SHAPES:  # The transcription is optimi's rule too.
    np.testing.assert_allclose(np.stack(want[k]), np.stack(theirs[k]),
                               rtol=1e-10, atol=1e-13)


def test_float32_is_close_to_the_float64_rule():
  steps = 14
  grads, params = planted_grads(steps), initial_params()
  want, us = stable_adamw_reference(grads, params, steps)
  tx = oc.clip_update_rms(
      optax.adamw(LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD),
      leaf_norms=True)
  p = jax.tree.map(jnp.float32, params)
  s = tx.init(p)
  update = jax.jit(tx.update)
  for t in range(steps):
    u, s = update({k: jnp.float32(grads[k][t]) for k in SHAPES}, s, p)
    p = optax.apply_updates(p, u)
    for k in SHAPES:
      np.testing.assert_allclose(s.stats.leaf_norms[k], us[k][t], rtol=1e-5)
  for k in SHAPES:
    np.testing.assert_allclose(p[k], want[k][-1], rtol=1e-5, atol=1e-6)


def test_without_bias_correction_reads_nu_as_is():
  # rmsprop keeps nu = EMA of g^2 and no count: no bias correction, no
  # decay needed; its eps is added, not a floor, so eps= is given.
  g = np.array([[1.0, 2.0], [3.0, 40.0]])
  tx = oc.clip_update_rms(optax.rmsprop(0.1, decay=0.9, eps=0.0), eps=1e-3,
                          leaf_norms=True)
  params = {"w": jnp.zeros(2)}
  state = tx.init(params)
  nu = np.zeros(2)
  for row in g:
    nu = 0.9 * nu + 0.1 * row ** 2
    u_want = math.sqrt(np.mean(row ** 2 / np.maximum(nu, 1e-6)))
    plain = -0.1 * row / np.sqrt(nu)
    out, state = tx.update({"w": jnp.asarray(row, jnp.float32)}, state,
                           params)
    np.testing.assert_allclose(state.stats.leaf_norms["w"], u_want,
                               rtol=1e-6)
    np.testing.assert_allclose(out["w"], plain / max(1.0, u_want), rtol=1e-5)


# b2 and eps read off the wrapped optimizer. eps = 0.5 binds (eps**2 is
# above v-hat for the small elements), so a wrong eps changes u, as a wrong
# b2 does from the second step.

ADAMS = {
    "adam": lambda: optax.adam(LR, b1=B1, b2=0.95, eps=0.5),
    "adamw": lambda: optax.adamw(LR, b2=0.95, eps=0.5, weight_decay=WD),
    "inject_hyperparams(adamw)": lambda: optax.inject_hyperparams(
        optax.adamw)(learning_rate=LR, b2=0.95, eps=0.5),
    "chain(adamw, clip)": lambda: optax.chain(
        optax.adamw(LR, b2=0.95, eps=0.5), optax.clip(1e3)),
    "multi_transform": lambda: optax.multi_transform(
        {"adam": optax.adam(LR, b2=0.95, eps=0.5), "sgd": optax.sgd(LR)},
        lambda p: jax.tree.map(lambda _: "adam", p)),
}


@pytest.mark.parametrize("name", sorted(ADAMS))
@pytest.mark.slow
def test_reads_b2_and_eps_off_the_optimizer(name):
  steps = 6
  grads, params = planted_grads(10), initial_params()
  _, us = stable_adamw_reference(grads, params, steps, b2=0.95, eps=0.5)
  for b2, eps in ((0.999, 0.5), (0.95, 1e-6)):  # Wrong values differ.
    _, wrong = stable_adamw_reference(grads, params, steps, b2=b2, eps=eps)
    assert not np.allclose(wrong["w"], us["w"], rtol=1e-3)
  tx = oc.clip_update_rms(ADAMS[name](), leaf_norms=True)
  _, states = helpers.run_scan(
      tx, jax.tree.map(lambda x: jnp.float32(x[:steps]), grads),
      jax.tree.map(jnp.float32, params))
  for k in SHAPES:
    np.testing.assert_allclose(states.stats.leaf_norms[k], us[k], rtol=1e-5,
                               err_msg=k)
  assert int(states.stats.num_clipped[-1]) >= 1  # w at step 4.


def test_follows_b2_set_in_an_inject_hyperparams_state():
  # The state's b2 (set to 0.5) is the one adam and the rule both use; u
  # depends on it from the second step (the first has u = 1 whatever b2).
  params = {"w": jnp.zeros(3)}
  grads = {"w": jnp.array([[1.0, -2.0, 3.0], [4.0, 0.5, -1.0]])}
  injected = oc.clip_update_rms(optax.inject_hyperparams(optax.adam)(
      learning_rate=LR, b2=0.95), eps=EPS, leaf_norms=True)
  state = injected.init(params)
  state.inner_state.hyperparams["b2"] = jnp.asarray(0.5)
  update = jax.jit(injected.update)
  for g in grads["w"]:
    _, state = update({"w": g}, state, params)
  plain = oc.clip_update_rms(optax.adam(LR, b2=0.5), eps=EPS, leaf_norms=True)
  _, want = helpers.run_scan(plain, grads, params)
  np.testing.assert_allclose(state.stats.leaf_norms["w"],
                             want.stats.leaf_norms["w"][-1], rtol=1e-6)
  _, unset = helpers.run_scan(injected, grads, params)  # b2 = 0.95.
  assert not np.isclose(float(unset.stats.leaf_norms["w"][-1]),
                        float(state.stats.leaf_norms["w"]), rtol=1e-3)


@pytest.mark.parametrize("inner, match", [
    (lambda: optax.sgd(0.1), "no second moment"),
    # Two Adams, two b2: which one is unclear.
    (lambda: optax.chain(optax.adam(0.1, b2=0.9), optax.adam(0.1, b2=0.99)),
     "several values of b2.*decay="),
    # A count to bias-correct with, but no b2 anywhere.
    (lambda: optax.chain(optax.scale_by_rms(bias_correction=True),
                         optax.scale(-0.1)), "decay="),
    # No count: no decay needed, but the eps is rmsprop's, added.
    (lambda: optax.rmsprop(0.1), "eps="),
    # b2 a static argument of inject_hyperparams: not in the state.
    (lambda: optax.inject_hyperparams(optax.adam, static_args=("b2",))(
        learning_rate=0.1, b2=0.9), "b2.*decay="),
])
def test_cannot_read_b2_or_eps(inner, match):
  tx = oc.clip_update_rms(inner())
  with pytest.raises(ValueError, match=match):
    tx.init({"w": jnp.zeros(2)})


def test_finds_nu_inside_chain_and_inject_hyperparams_and_logs():
  inner = optax.chain(optax.inject_hyperparams(
      optax.adamw)(learning_rate=LR, b2=B2, eps=EPS), optax.clip(10.0))
  opt = optax.chain(oc.clip_update_rms(inner), oc.clip_by_global_norm(1.0))
  params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
  grads = jax.tree.map(lambda x: jnp.float32(x[:6]), planted_grads(10))
  _, states = helpers.run_scan(opt, grads, params)
  stats = oc.clip_stats(jax.tree.map(lambda x: x[-1], states), scalars=True)
  assert int(stats["clip_update_rms/count"]) == 6
  assert int(stats["clip_update_rms/num_clipped"]) >= 1  # w at step 4.
  assert float(stats["clip_update_rms/largest_rms"]) > 0
  assert float(states[0].largest_rms[4]) > 1  # w at step 4.
  assert int(states[0].num_leaves_clipped[4]) >= 1
  assert "clip_update_rms/norm" not in stats
  assert "clip_by_global_norm/norm" in stats


@pytest.mark.parametrize("before", [
    optax.clip_by_global_norm(1.0),
    pytest.param(oc.clip_by_global_norm(1.0), marks=pytest.mark.slow)])
def test_a_transformation_before_the_second_moment_is_refused(before):
  # The RMS would divide the gradient entering the wrapper by the second
  # moment of the transformed gradient (issue 30: RMS 3.54 and a clip,
  # where torch-optimi after clip_grad_norm_ gives 0.71 and none).
  g = {"w": jnp.array([3.0, 4.0, 0.0, 0.0])}
  adamw = optax.adamw(0.1, b2=0.99)
  tx = oc.clip_update_rms(optax.chain(before, adamw), decay=0.99)
  with pytest.raises(ValueError, match=r"before its second moment.*"
                     r"optax\.chain\(clip, oc\.clip_update_rms\("):
    tx.init(g)
  # The fix the error names: the RMS of the gradient Adam saw.
  opt = optax.chain(before, oc.clip_update_rms(adamw, decay=0.99))
  state = opt.init(g)
  updates, state = opt.update(g, state, g)
  seen = before.update(g, before.init(g), g)[0]["w"]
  want = np.sqrt(np.mean(np.where(seen != 0, 1.0, 0.0)))  # v̂ = g'^2.
  np.testing.assert_allclose(state[1].largest_rms, want, rtol=1e-5)
  want_u, _ = adamw.update({"w": seen}, adamw.init(g), g)
  np.testing.assert_allclose(updates["w"], want_u["w"], rtol=1e-6)


def test_keeps_no_parameter_sized_buffer():
  params = {k: jnp.zeros(s) for k, s in SHAPES.items()}
  inner = optax.adamw(LR)
  state = oc.clip_update_rms(inner).init(params)
  size = lambda t: sum(np.size(x) for x in jax.tree.leaves(t))  # noqa: E731
  assert size(state) == size(inner.init(params)) + 7


def test_edge_cases():
  tx = oc.clip_update_rms(optax.adam(0.1, b2=0.9), eps=0.0, leaf_norms=True)
  params = {"z": jnp.zeros(3), "n": jnp.zeros(2)}
  state = tx.init(params)
  # A zero tensor with eps = 0: u = 0, no NaN of ours; NaN gives NaN.
  out, state = tx.update({"z": jnp.zeros(3), "n": jnp.array([1.0, jnp.nan])},
                         state, params)
  assert float(state.stats.leaf_norms["z"]) == 0.0
  np.testing.assert_array_equal(out["z"], np.zeros(3))
  assert np.isnan(float(state.stats.leaf_norms["n"]))
  assert np.all(np.isnan(np.asarray(out["n"])))
  assert int(state.num_leaves_clipped) == 0


def test_unclipped_tensors_pass_bit_for_bit():
  params = {k: jnp.ones(s) for k, s in SHAPES.items()}
  inner = optax.adamw(LR, b2=B2)
  tx = oc.clip_update_rms(inner)
  s_in, s_tx = inner.init(params), tx.init(params)
  for scale in (1.0, 0.5):  # u = 1, then 0.63.
    g = {k: jnp.full(s, scale) for k, s in SHAPES.items()}
    want, s_in = jax.jit(inner.update)(g, s_in, params)
    got, s_tx = tx.update(g, s_tx, params)
  for k in SHAPES:
    np.testing.assert_array_equal(got[k], want[k])
  np.testing.assert_allclose(float(s_tx.largest_rms), 0.6339, rtol=1e-3)
  assert float(s_tx.stats.scale) == 1.0 and not bool(s_tx.stats.clipped)


SHARDED = {
    "clip_update_rms": lambda a: oc.clip_update_rms(
        optax.adam(0.1, b2=0.9), axis_name=a, leaf_norms=True),
    "clip_update_by_history": lambda a: oc.clip_update_by_history(
        window=3, num_std=1.0, axis_name=a),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SHARDED))
def test_sharded_jit_and_shard_map_match_one_device(name):
  # Plain jit on sharded arrays, and shard_map with axis_name (each device
  # holding a slice of every tensor): the results of one device.
  mesh = jax.make_mesh((len(jax.devices()),), ("data",))
  shapes = {"w": (8 * 3, 4), "b": (8,)}
  rng = np.random.default_rng(0)
  grads = [{k: jnp.asarray(rng.standard_normal(s) * (30.0 if t == 2 else 1),
                           jnp.float32) for k, s in shapes.items()}
           for t in range(4)]
  params = {k: jnp.ones(s) for k, s in shapes.items()}
  spec = {k: P("data") for k in shapes}

  def put(tree, specs):
    return jax.tree.map(
        lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs)

  def run(tx, update):
    state = tx.init(params)
    outs = []
    for g in grads:
      u, state = update(g, state)
      outs.append(u)
    return outs, state

  tx = SHARDED[name](None)
  want, want_state = run(tx, jax.jit(lambda g, s: tx.update(g, s, params)))
  update = jax.jit(tx.update)
  got, _ = run(tx, lambda g, s: update(put(g, spec), s, put(params, spec)))
  mapped_tx = SHARDED[name]("data")
  # Parameter-shaped buffers (Adam's moments) are sharded, the rest not.
  ss = jax.tree.map(lambda x: P("data") if np.shape(x) in shapes.values()
                    else P(), mapped_tx.init(params))
  body = jax.jit(jax.shard_map(
      lambda g, s, p: mapped_tx.update(g, s, p), mesh=mesh,
      in_specs=(spec, ss, spec), out_specs=(spec, ss), check_vma=False))
  mapped, mapped_state = run(mapped_tx, lambda g, s: body(
      put(g, spec), put(s, ss), put(params, spec)))
  for a, b, c in zip(want, got, mapped):
    for k in shapes:
      np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-8)
      np.testing.assert_allclose(c[k], a[k], rtol=1e-6, atol=1e-8)
  for (path, a), c in zip(jax.tree_util.tree_leaves_with_path(want_state),
                          jax.tree.leaves(mapped_state)):
    at = jax.tree_util.keystr(path)
    if "clipped" in at and name == "clip_update_rms":
      continue  # Step 1 has u = 1 to rounding: clipped by 1 +- 1 ulp.
    np.testing.assert_allclose(np.asarray(c, np.float64),
                               np.asarray(a, np.float64), rtol=1e-6,
                               err_msg=at)


@pytest.mark.parametrize("build, error, match", [
    (lambda: oc.clip_update_rms(optax.sgd(0.1), decay=0.9), ValueError,
     "nu"),
    (lambda: oc.clip_update_rms(optax.rmsprop(0.1), decay=0.9, eps=1e-6),
     ValueError, "decay=None"),
    (lambda: oc.clip_update_rms(optax.adam(0.1), decay=1.0), ValueError,
     "decay"),
    (lambda: oc.clip_update_rms(optax.adam(0.1), eps=-1.0), ValueError,
     "eps"),
    (lambda: oc.clip_update_rms(lambda g: g), TypeError, "inner"),
    (lambda: oc.clip_update_rms(optax.adam(0.1), decay="0.9"), TypeError,
     "decay"),
    (lambda: oc.clip_update_rms(optax.adam(0.1), b2=0.9), TypeError,
     "b2= is now decay="),
    (lambda: oc.clip_update_by_history(window=1), ValueError, "window"),
    (lambda: oc.clip_update_by_history(window=2.5), TypeError, "window"),
    (lambda: oc.clip_update_by_history(window=4, min_history=5), ValueError,
     "min_history"),
    (lambda: oc.clip_update_by_history(window=4, min_history=0), ValueError,
     "min_history"),
    (lambda: oc.clip_update_by_history(num_std=-1.0), ValueError, "num_std"),
    (lambda: oc.clip_update_by_history(std_floor=-1.0), ValueError,
     "std_floor"),
    (lambda: oc.clip_update_by_history(8), TypeError, "positional"),
    (lambda: oc.clip_update_by_history(sigma=1.0), TypeError,
     "sigma= is now num_std="),
    (lambda: oc.clip_update_by_history(min_std=1e-6), TypeError,
     "std_floor=.*relative"),
])
def test_bad_arguments_name_the_argument(build, error, match):
  with pytest.raises(error, match=match):
    tx = build()
    tx.init({"w": jnp.zeros(2)})


# ----------------------------------------------------------------------------
# The historical update-norm clip.


def history_reference(norms, window=128, num_std=3.0, min_history=None,
                      std_floor=1e-6, levanter=False):
  """Per step: the threshold and the factor, in float64.

  The threshold is mean + num_std * max(std, std_floor * mean) (population
  std) of the last ``window`` recorded unclipped norms, the current one
  excluded, or inf while fewer than ``min_history`` (default max(2,
  window // 2)) are recorded. Non-finite norms are left out of the record.
  With ``levanter``, levanter's code instead: the floor on the std is the
  absolute 1e-6, and non-finite norms go into the record.
  """
  least = max(2, window // 2) if min_history is None else min_history
  record = []
  out = []
  for n in norms:
    if len(record) >= least:
      h = np.asarray(record[-window:], np.float64)
      floor = 1e-6 if levanter else std_floor * abs(h.mean())
      t = h.mean() + num_std * max(h.std(), floor)
    else:
      t = math.inf
    if math.isnan(n):
      factor = math.nan
    elif math.isnan(t) or n <= t:  # levanter: n > NaN is False.
      factor = 1.0
    else:
      factor = t / n  # 0 for n = inf.
    out.append((t, factor))
    if math.isfinite(n) or levanter:
      record.append(n)
  return out


def norm_sequence():
  """Plateaus, slow drift, spikes, a NaN and an inf."""
  rng = np.random.default_rng(3)
  norms = list(1.0 + 0.05 * rng.standard_normal(30))  # Noisy.
  norms += [2.0] * 12  # A plateau: std -> 0 at its end.
  norms += [2.0 + 1e-9, 9.0]  # A hair above, then a spike.
  norms += list(np.linspace(2.0, 6.0, 10))  # A drift up.
  norms += [math.nan, 40.0, math.inf, 5.0, 300.0, 5.5, 0.0, 6.0]
  return norms


@functools.lru_cache
def history_program(window, min_history=None):
  """One compiled run per window (the buffer's size); num_std and the norms
  are arguments. Returns every step's update and state."""

  def run(num_std, norms):
    tx = oc.clip_update_by_history(window=window, num_std=num_std,
                                   min_history=min_history)
    g = norms[:, None] * jnp.array([0.6, -0.8])  # NaN and inf carry over.
    return helpers.run_scan(tx, g)

  return jax.jit(run)


@pytest.mark.parametrize("window, num_std, min_history", [
    (8, 3.0, None), (4, 1.0, None), (128, 3.0, None), (3, 0.0, 3)])
def test_history_matches_float64_transcription(window, num_std, min_history):
  norms = norm_sequence()
  want = history_reference(norms, window, num_std, min_history)
  with jax.enable_x64(True):
    u, s = history_program(window, min_history)(
        jnp.float64(num_std), jnp.asarray(norms, jnp.float64))
    np.testing.assert_allclose(s.stats.threshold, [t for t, _ in want],
                               rtol=1e-12)
    np.testing.assert_allclose(s.stats.scale, [f for _, f in want],
                               rtol=1e-12)
    finite = np.isfinite(norms)
    np.testing.assert_allclose(np.asarray(s.stats.norm)[finite],
                               np.asarray(norms)[finite], rtol=1e-12)
    np.testing.assert_allclose(
        np.linalg.norm(np.asarray(u)[finite], axis=1),
        [n * f for n, (_, f) in zip(np.asarray(norms)[finite],
                                    np.asarray(want)[finite])], rtol=1e-12)
    over = np.asarray([f < 1 for _, f in want])
    np.testing.assert_array_equal(s.stats.clipped, over)
    np.testing.assert_array_equal(s.stats.num_clipped, np.cumsum(over))
    np.testing.assert_array_equal(
        s.fill[-1], min(window, int(np.sum(finite))))
  assert np.all(np.isnan(np.asarray(u)[np.isnan(norms)]))


def test_history_in_float32():
  norms = norm_sequence()
  want = history_reference(norms, 8, 3.0)
  _, s = history_program(8)(jnp.float32(3.0), jnp.asarray(norms, jnp.float32))
  np.testing.assert_allclose(s.stats.threshold, [t for t, _ in want],
                             rtol=1e-5)
  np.testing.assert_allclose(s.stats.scale, [f for _, f in want], rtol=1e-5)


def test_history_agrees_with_levanter_on_finite_norms_only():
  # On finite norms the rule is levanter's but for the floor of the std
  # (relative here, absolute 1e-6 there), which binds only on the plateau;
  # a NaN levanter records turns its clipping off for a whole window, which
  # recording finite norms avoids.
  norms = norm_sequence()
  cut = next(i for i, n in enumerate(norms) if math.isnan(n))
  ours = history_reference(norms, 8)
  theirs = history_reference(norms, 8, levanter=True)
  differ = [i for i in range(cut) if ours[i] != theirs[i]]
  assert differ and set(differ) <= set(range(38, 44))  # The plateau's end.
  np.testing.assert_allclose(ours[:cut], theirs[:cut], rtol=2e-6)
  assert norms[cut + 1] == 40.0 and ours[cut + 1][1] < 0.5
  assert math.isnan(theirs[cut + 1][0]) and theirs[cut + 1][1] == 1.0


@settings(max_examples=20, deadline=None)
# Norms whose squares are normal floats: XLA flushes subnormals to zero, so
# a window of norms below ~1e-154 would read a zero deviation.
@given(st.lists(st.just(0.0) | st.floats(1e-100, 1e6)
                | st.sampled_from([math.nan, math.inf]),
                min_size=16, max_size=16),
       st.sampled_from([2, 3, 5]), st.floats(0.0, 5.0, allow_subnormal=False))
@pytest.mark.slow
def test_history_property(norms, window, num_std):
  want = history_reference(norms, window, num_std)
  with jax.enable_x64(True):
    _, s = history_program(window)(jnp.float64(num_std), jnp.asarray(norms))
    np.testing.assert_allclose(s.stats.threshold, [t for t, _ in want],
                               rtol=1e-9)
    np.testing.assert_allclose(s.stats.scale, [f for _, f in want],
                               rtol=1e-9)


def test_history_chains_after_an_optimizer_and_logs():
  opt = optax.chain(optax.adam(0.1),
                    oc.clip_update_by_history(window=4, num_std=1.0))
  params = {"w": jnp.ones(3)}
  grads = {"w": jnp.asarray([1.0, 1.0, 1.0, 1.0, 1e4])[:, None]
           * jnp.ones(3)}
  _, states = helpers.run_scan(opt, grads, params)
  stats = oc.clip_stats(jax.tree.map(lambda x: x[-1], states), scalars=True)
  assert int(stats["clip_update_by_history/fill"]) == 4
  assert int(stats["clip_update_by_history/count"]) == 5
  assert "clip_update_by_history/norm_history" not in stats
  assert np.isfinite(float(stats["clip_update_by_history/threshold"]))
  assert float(stats["clip_update_by_history/norm"]) > 0


def test_history_edge_cases():
  tx = oc.clip_update_by_history(window=2, num_std=math.inf, min_history=1)
  s = tx.init(jnp.zeros(2))
  for g in ([1.0, 0.0], [0.0, 0.0], [1e3, 0.0]):
    u, s = tx.update(jnp.array(g), s)
    np.testing.assert_array_equal(u, g)  # num_std = inf never clips.
  assert float(s.stats.threshold) == math.inf
  # A plateau of equal norms: std = 0, the threshold is mean * (1 + num_std
  # * std_floor).
  tx = oc.clip_update_by_history(window=4, num_std=2.0, min_history=2,
                                 std_floor=1e-3)
  s = tx.init(jnp.zeros(1))
  for g in (5.0, 5.0, 5.0, 6.0):
    u, s = tx.update(jnp.array([g]), s)
  np.testing.assert_allclose(float(s.stats.threshold), 5.01, rtol=1e-6)
  np.testing.assert_allclose(u, [5.01], rtol=1e-6)
  # A plateau of zeros: the threshold is 0; a zero update passes, a nonzero
  # one is zeroed.
  tx = oc.clip_update_by_history(window=4, num_std=2.0, min_history=2)
  s = tx.init(jnp.zeros(1))
  for g in (0.0, 0.0, 0.0):
    u, s = tx.update(jnp.array([g]), s)
  np.testing.assert_array_equal(u, [0.0])
  u, s = tx.update(jnp.array([1.0]), s)
  assert float(s.stats.threshold) == 0.0 and float(s.stats.scale) == 0.0
  np.testing.assert_array_equal(u, [0.0])
