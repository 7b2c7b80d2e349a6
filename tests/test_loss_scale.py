"""dynamic_loss_scale against a float64 NumPy transcription of
``torch.amp.GradScaler`` (and, where torch is installed, the real one).

The reference keeps the scale as a float32 number, as torch does: a backoff
or growth multiplies in float64 and rounds to float32
(``_amp_update_scale_``), gradients are unscaled by the float32 reciprocal
of the scale taken in float64 (``GradScaler.unscale_``).
"""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc
from tests import _helpers as helpers


class GradScalerReference:
  """GradScaler's rule, step by step, in float64 NumPy.

  ``step(grads)`` unscales the gradients, says whether one was NaN or
  infinite, and updates the scale and the count of good steps: on an
  overflow the scale is multiplied by ``backoff_factor`` (not below
  ``min_scale``; torch has no floor: ``min_scale=0``) and the count goes
  back to 0; otherwise the count goes up and, reaching ``growth_interval``,
  goes back to 0 while the scale is multiplied by ``growth_factor`` unless
  the product overflows float32.
  """

  def __init__(self, init_scale, growth_factor=2.0, backoff_factor=0.5,
               growth_interval=2000, min_scale=0.0):
    self.scale = np.float32(init_scale)
    self.good = 0
    self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
    self.growth_interval, self.min_scale = growth_interval, min_scale

  def step(self, grads):
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
      inv = np.float32(1.0 / np.float64(self.scale))
      unscaled = [(np.asarray(g, np.float32) * inv).astype(np.asarray(g).dtype)
                  for g in grads]
      overflow = not all(np.all(np.isfinite(np.asarray(g, np.float64)))
                         for g in grads)
      if overflow:
        self.scale = np.float32(max(np.float64(self.scale)
                                    * self.backoff_factor, self.min_scale))
        self.good = 0
      else:
        self.good += 1
        if self.good == self.growth_interval:
          grown = np.float32(np.float64(self.scale) * self.growth_factor)
          if np.isfinite(grown):
            self.scale = grown
          self.good = 0
    return unscaled, overflow


# Overflow pattern: growth after 3 good steps; an overflow after 2 good
# steps resets the count (growth comes 3 steps later, not 1); a run of
# overflows backs the scale off to the floor.
PATTERN = [0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0]
CONFIGS = {  # init_scale, growth_factor, backoff_factor, growth_interval,
    # min_scale
    "torch": (16.0, 2.0, 0.5, 3, 0.0),
    "floor": (16.0, 2.0, 0.5, 3, 1.0),
    "odd_factors": (1000.0, 1.5, 0.375, 2, 0.0),
    # Factors that float32 cannot hold: torch multiplies in float64.
    "inexact_factors": (1000.0, 1.7, 0.3, 2, 0.0),
    "cap": (2.0**126, 2.0, 0.5, 1, 0.0),  # Growth stops below float32 inf.
}
TRUE = {"h": np.array([1e-3, -2e-3, 5e-4]), "f": np.array([[0.25, -1.0]])}
DTYPES = {"h": np.float16, "f": np.float32}


def scaled_steps(config, pattern):
  """The scaled gradients a user would feed, step by step (the true ones
  times the reference's scale, an inf where the pattern overflows), and the
  reference's unscaled gradients, overflows, scales and counts."""
  ref = GradScalerReference(*config)
  grads, out = [], []
  for t, bad in enumerate(pattern):
    tiny = config[0] > 1e30  # The cap run: gradients whose products fit.
    g = {k: (v * (1 + t / 10) * (2.0**-120 if tiny else 1.0)
             * np.float64(ref.scale)).astype(DTYPES[k])
         for k, v in TRUE.items()}
    if bad:
      g["h"][1] = np.inf
    grads.append(g)
    unscaled, overflow = ref.step(list(g.values()))
    out.append((dict(zip(g, unscaled)), overflow, ref.scale, ref.good))
  stacked = {k: np.stack([g[k] for g in grads]) for k in TRUE}
  return stacked, out


def as_float32(config):
  """``config`` with its growth and backoff factors rounded to float32."""
  init, growth, backoff, interval, floor = config
  return (init, float(np.float32(growth)), float(np.float32(backoff)),
          interval, floor)


def _run_configs(configs, grads):
  """Every configuration over its own steps, compiled once: the
  hyper-parameters are traced."""

  def one(config, grads):
    init, growth, backoff, interval, floor = config
    tx = oc.dynamic_loss_scale(optax.identity(), init_scale=init,
                               growth_factor=growth, backoff_factor=backoff,
                               growth_interval=interval, min_scale=floor)
    first = jax.tree.map(lambda x: x[0], grads)
    return helpers.run_scan(tx, grads, first)

  return jax.vmap(one)(configs, grads)


def test_matches_gradscaler_rule_step_by_step():
  names = list(CONFIGS)
  # The factors act as float32 numbers: the rule is exactly torch's with
  # them rounded to float32.
  runs = [scaled_steps(as_float32(CONFIGS[n]), PATTERN) for n in names]
  configs = tuple(jnp.asarray([CONFIGS[n][i] for n in names],
                              jnp.int32 if i == 3 else jnp.float32)
                  for i in range(5))
  grads = {k: jnp.stack([r[0][k] for r in runs]) for k in TRUE}
  updates, states = jax.jit(_run_configs)(configs, grads)
  for c, name in enumerate(names):
    expected = runs[c][1]
    got = np.asarray(states.loss_scale[c])
    np.testing.assert_array_equal(got, [e[2] for e in expected],
                                  err_msg=name)
    np.testing.assert_array_equal(states.good_steps[c],
                                  [e[3] for e in expected], err_msg=name)
    np.testing.assert_array_equal(states.inner_state.skipped[c],
                                  [e[1] for e in expected], err_msg=name)
    for t, (unscaled, overflow, _, _) in enumerate(expected):
      for k in TRUE:
        got = np.asarray(updates[k][c, t])
        want = np.zeros_like(unscaled[k]) if overflow else unscaled[k]
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want, err_msg=f"{name} {t} {k}")
  scales = {n: [e[2] for e in runs[i][1]] for i, n in enumerate(names)}
  # torch multiplies the float32 scale by float64 factors: factors that
  # float32 cannot hold give scales a few float32 ulps apart after 20 steps.
  torch_rule = scaled_steps(CONFIGS["inexact_factors"], PATTERN)[1]
  np.testing.assert_allclose(scales["inexact_factors"],
                             [e[2] for e in torch_rule], rtol=4e-6)
  assert scales["inexact_factors"] != [e[2] for e in torch_rule]
  assert scales["floor"][16] == 1.0 and scales["torch"][16] < 1.0
  assert scales["cap"][:4] == [np.float32(2.0**127)] * 4  # 2**128 is inf.
  assert scales["odd_factors"][4] == np.float32(1000 * 1.5**2 * 0.375)


@pytest.mark.slow
def test_clips_unscaled_gradients_and_skips_like_the_bare_optimizer():
  # Under jit, chain(clip_by_global_norm, adam) inside the loss scale, fed
  # scaled gradients with overflows, gives bit for bit what the bare chain
  # gives when fed the true gradients of the good steps alone; an inner
  # skip_step judges the true norm; an outer one would freeze the scale.
  steps, overflows, spike = 10, {3, 6}, 8
  rng = np.random.default_rng(0)
  true = [{"w": rng.normal(size=(3, 2)).astype(np.float32),
           "b": rng.normal(size=2).astype(np.float32)} for _ in range(steps)]
  true[spike] = jax.tree.map(lambda x: 50 * x, true[spike])
  ref = GradScalerReference(2.0**10, growth_interval=2, min_scale=1.0)
  fed = []
  for t, g in enumerate(true):
    g = {k: v * ref.scale for k, v in g.items()}
    if t in overflows:
      g["w"][0, 0] = np.nan
    fed.append(g)
    ref.step(list(g.values()))
  params = jax.tree.map(jnp.zeros_like, true[0])

  def opt():
    return optax.chain(oc.clip_by_global_norm(1.0), optax.adam(0.1))

  stack = lambda trees: jax.tree.map(lambda *x: jnp.stack(x), *trees)  # noqa: E731

  def run(fed):
    scaled = oc.dynamic_loss_scale(
        oc.skip_step(opt(), skip_norm=20.0), growth_interval=2,
        init_scale=2.0**10)
    wrong = oc.skip_step(oc.dynamic_loss_scale(
        opt(), growth_interval=2, init_scale=2.0**10), skip_norm=20.0)

    def step(states, g):
      u, s0 = scaled.update(g, states[0], params)
      _, s1 = wrong.update(g, states[1], params)
      return (s0, s1), (u, s0, s1)

    return jax.lax.scan(step, (scaled.init(params), wrong.init(params)),
                        stack(fed))

  def bare(true):  # A run in which the bad batches never came.
    tx = opt()

    def step(s, g):
      u, s = tx.update(g, s, params)
      return s, u

    return jax.lax.scan(step, tx.init(params), stack(true))

  (s0, _), (u, states, wrong) = jax.jit(run)(fed)
  taken = ~np.asarray(states.inner_state.skipped | states.inner_state
                      .inner_state.skipped)
  assert list(np.flatnonzero(~taken)) == [3, 6, spike]
  sb, ub = jax.jit(bare)([g for g, ok in zip(true, taken) if ok])
  for k in ("w", "b"):
    np.testing.assert_array_equal(np.asarray(u[k])[taken], ub[k])
    assert np.all(np.asarray(u[k])[~taken] == 0)
  inner = s0.inner_state.inner_state.inner_state
  for a, b in zip(jax.tree.leaves(inner), jax.tree.leaves(sb)):
    np.testing.assert_array_equal(a, b)
  # The clipper and both guards saw the true norms.
  clip_norm = np.asarray(states.inner_state.inner_state.inner_state[0]
                         .stats.norm)
  true_norms = np.array([helpers.np_norm(g) for g in true])
  np.testing.assert_allclose(clip_norm[taken], true_norms[taken], rtol=1e-6)
  user_guard = np.asarray(states.inner_state.inner_state.stats.norm)
  np.testing.assert_allclose(user_guard[taken | (true_norms > 20)],
                             true_norms[taken | (true_norms > 20)], rtol=1e-6)
  np.testing.assert_array_equal(states.loss_scale[-1], ref.scale)
  # Outside, skip_step judges the scaled norms (every step is skipped) and
  # swallows the overflows: the scale never moves.
  assert np.all(np.asarray(wrong.inner_state.loss_scale) == 2.0**10)
  assert int(wrong.num_skipped[-1]) == steps


def test_loss_scale_reads_the_state_wherever_it_sits():
  params = {"w": jnp.zeros(2)}
  opt = optax.chain(optax.identity(), oc.dynamic_loss_scale(
      optax.adam(0.1), init_scale=512.0))
  state = opt.init(params)
  # Checkpointable: a tree of arrays, rebuilt from its leaves (as Orbax
  # restores it against a target) into the same types.
  leaves = jax.tree.leaves(state)
  assert all(isinstance(x, jax.Array) for x in leaves)
  back = jax.tree.unflatten(jax.tree.structure(state),
                            [np.asarray(x) for x in leaves])
  assert isinstance(back[1], oc.DynamicLossScaleState)
  assert float(oc.loss_scale(back)) == 512.0
  assert float(oc.loss_scale(state)) == 512.0
  assert float(oc.loss_scale({"opt": state})) == 512.0
  stats = oc.clip_stats(state)
  assert int(stats["dynamic_loss_scale/count"]) == 0
  assert float(stats["dynamic_loss_scale/loss_scale"]) == 512.0
  with pytest.raises(ValueError, match="no dynamic_loss_scale state"):
    oc.loss_scale(optax.sgd(0.1).init(params))


@pytest.mark.parametrize("kwargs, match", [
    (dict(init_scale=0.0), "init_scale"),
    (dict(init_scale=math.inf), "init_scale"),
    (dict(growth_factor=1.0), "growth_factor"),
    (dict(backoff_factor=1.0), "backoff_factor"),
    (dict(backoff_factor=0.0), "backoff_factor"),
    (dict(growth_interval=0), "growth_interval"),
    (dict(growth_interval=2.5), "growth_interval"),
    (dict(growth_interval=2**31), "growth_interval"),
    (dict(min_scale=-1.0), "min_scale"),
    (dict(min_scale=4.0, init_scale=2.0), "min_scale"),
])
def test_bad_arguments_name_themselves(kwargs, match):
  with pytest.raises((TypeError, ValueError), match=match):
    oc.dynamic_loss_scale(optax.sgd(0.1), **kwargs)


def test_inner_must_be_a_transformation():
  with pytest.raises(TypeError, match="inner"):
    oc.dynamic_loss_scale(0.1)


@pytest.mark.slow
def test_matches_torch_gradscaler():
  torch = pytest.importorskip("torch")
  pattern = [0, 0, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0]
  config = dict(init_scale=64.0, growth_factor=1.5, backoff_factor=0.25,
                growth_interval=3)
  w0 = np.array([0.5, -1.0, 2.0], np.float32)
  true = [np.array([0.1, 0.2, -0.3], np.float32) * (t + 1)
          for t in range(len(pattern))]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    scaler = torch.amp.GradScaler("cpu", **config)
  p = torch.nn.Parameter(torch.tensor(w0))
  sgd = torch.optim.SGD([p], lr=0.5)
  fed, torch_scales, torch_params = [], [], []
  for t, bad in enumerate(pattern):
    s = float(scaler.scale(torch.ones(())))
    g = true[t] * np.float32(s)
    if bad:
      g[1] = np.inf
    fed.append(g)
    p.grad = torch.tensor(g)
    scaler.step(sgd)
    scaler.update()
    torch_scales.append(scaler.get_scale())
    torch_params.append(p.detach().numpy().copy())
  opt = oc.dynamic_loss_scale(optax.sgd(0.5), min_scale=0.0, **config)
  updates, states = helpers.run_scan(opt, {"w": jnp.asarray(np.stack(fed))},
                                     {"w": jnp.asarray(w0)})
  np.testing.assert_array_equal(states.loss_scale, torch_scales)
  params = w0 + np.cumsum(np.asarray(updates["w"]), axis=0)
  np.testing.assert_allclose(params, torch_params, rtol=1e-6)
