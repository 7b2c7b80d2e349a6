"""Tests for skip_step's rolling spike rule (rule=oc.SpikeWindow(...)).

The references are float64 NumPy transcriptions of the published rules:
OLMo-core's ``SkipStepOptimizer.get_step_factor``, MaxText's
``skip_step_on_spikes`` and levanter's ``SkipStepConfig.wrap``, each written
the way its code keeps its window, and a generic one of the rule as
optaxclip defines it (which differs from them only on non-finite values and
the deviation floor).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optaxclip as oc
from tests._helpers import run_scan
from tests.test_skip_step import assert_bitwise_equal

# -- References ---------------------------------------------------------------


def olmo_core_skips(losses, norms, window, sigma):
  """OLMo-core: the trainer sets ``latest_loss`` and ``latest_grad_norm``
  every step (skipped steps too); each list keeps the last ``window + 1``
  values, the latest included. With fewer than ``max(2, window // 2)``
  values the step is taken; else the latest is compared with
  ``torch.std_mean`` (Bessel's correction) of the others, one-sided:
  taken iff ``latest - mean <= sigma * std`` for the loss and the norm."""
  hl, hn, out = [], [], []
  for loss, norm in zip(losses, norms):
    hl = (hl + [loss])[-(window + 1):]
    hn = (hn + [norm])[-(window + 1):]
    if len(hl) < max(2, window // 2):
      out.append(False)
      continue
    ok = True
    for hist in (hl, hn):
      past = np.asarray(hist[:-1], np.float64)
      ok = ok and bool(hist[-1] - past.mean() <= sigma * past.std(ddof=1))
    out.append(not ok)
  return np.array(out)


def maxtext_skips(losses, norms, interval, scaling):
  """MaxText: ring buffers of ``interval`` past values and a count; mean
  over the ``min(count, interval)`` valid ones, variance divided by
  ``max(1, valid - 1)``; one-sided on loss and norm; the rule is off while
  ``count + 1 < max(2, interval // 2)``; the value is written after the
  decision, whether the step was taken or not."""
  bufs = np.zeros((2, interval))
  count, out = 0, []
  for loss, norm in zip(losses, norms):
    valid = min(count, interval)
    ok = True
    for buf, x in zip(bufs, (loss, norm)):
      mean = buf[:valid].sum() / max(1, valid)
      var = ((buf[:valid] - mean) ** 2).sum() / max(1, valid - 1)
      ok = ok and bool(x - mean <= scaling * np.sqrt(var))
    ok = ok or (count + 1) < max(2, interval // 2)
    out.append(not ok)
    bufs[:, count % interval] = (loss, norm)
    count += 1
  return np.array(out)


def levanter_skips(losses, norms, window, sigma):
  """levanter: ring buffers of ``window`` past values with a validity mask;
  population deviation (``jnp.std``), floored at 1e-6; the rule applies
  once ``max(2, window // 2)`` earlier values are in; one-sided on loss and
  norm; the value enters after the decision, skipped or not."""
  bufs, valid = np.zeros((2, window)), np.zeros(window, bool)
  count, idx, out = 0, 0, []
  for loss, norm in zip(losses, norms):
    ok = True
    for buf, x in zip(bufs, (loss, norm)):
      past = buf[valid]
      mean = past.mean() if past.size else np.nan
      std = max(past.std() if past.size else np.nan, 1e-6)
      ok = ok and bool(x <= mean + sigma * std)
    out.append(count >= max(2, window // 2) and not ok)
    bufs[:, idx], valid[idx] = (loss, norm), True
    idx, count = (idx + 1) % window, min(count + 1, window)
  return np.array(out)


def rolling_reference(losses, norms, rule):
  """The rule as optaxclip defines it: each watched value is compared with
  the mean and deviation of the finite earlier values in its window; a
  non-finite value is skipped and stays out; the deviation is at least
  ``std_floor * |mean|``. Returns the skips and the upper bounds (inf
  before ``min_history``)."""
  min_history = rule.min_history or max(2, rule.window // 2)
  watched = {"both": (1, 1), "loss": (1, 0), "norm": (0, 1)}[rule.watch]
  hists = ([], [])
  skips, bounds = [], []
  for values in zip(losses, norms):
    skip, bound = False, [np.inf, np.inf]
    for i, (x, hist) in enumerate(zip(values, hists)):
      if not watched[i]:
        continue
      if len(hist) >= min_history:
        past = np.asarray(hist, np.float64)
        mean = past.mean()
        std = max(past.std(ddof=rule.ddof), rule.std_floor * abs(mean))
        bound[i] = mean + rule.num_std * std
        skip |= x > bound[i]
        skip |= rule.two_sided and x < mean - rule.num_std * std
      if not np.isfinite(x):
        skip = True
        continue
      hist.append(x)
      del hist[:-rule.window]
    skips.append(skip)
    bounds.append(bound)
  return np.array(skips), np.array(bounds)


# -- Recorded sequences -------------------------------------------------------


def _sequence(kind, n=400, seed=0):
  """(losses, norms) as float32 values: a falling loss with noise, and
  planted spikes, a plateau or a lasting change of level."""
  rng = np.random.default_rng(seed)
  t = np.arange(n)
  losses = 2.0 + np.exp(-t / 150) + 0.02 * rng.standard_normal(n)
  norms = 1.0 + 0.1 * rng.standard_normal(n)
  if kind == "spikes":
    for at, x in ((60, 1.5), (61, 1.3), (200, 2.0), (333, 1.2)):
      losses[at:at + 1] *= x
    for at, x in ((90, 10.0), (150, 4.0), (151, 4.0), (152, 4.0), (300, 30.0)):
      norms[at:at + 1] *= x
  elif kind == "plateau":
    losses[100:250] = 2.5
    norms[100:250] = 0.75
    losses[[180, 240]] = [2.5 + 1e-4, 3.5]
  elif kind == "level":
    norms[150:] *= 8.0
  return losses.astype(np.float32), norms.astype(np.float32)


def _scan(opt, losses, norms):
  """Runs ``opt`` on gradients ``[norm, 0]`` with the losses passed to
  ``update``: every step's updates and state (JAX arrays)."""
  norms = jnp.asarray(norms)
  return run_scan(opt, {"w": jnp.stack([norms, jnp.zeros_like(norms)], 1)},
                  {"w": jnp.zeros(2)}, loss=jnp.asarray(losses))


def _run(opt, losses, norms):
  """Per step: skipped, loss bound (inf when the loss is not watched), norm
  threshold, and the update's first entry, from one jitted scan over the
  steps; the final state too."""
  updates, states = _scan(opt, losses, norms)
  bound = (states.loss_threshold if states.loss_threshold is not None
           else jnp.full(len(norms), jnp.inf))
  out = (states.skipped, bound, states.stats.threshold, updates["w"][:, 0])
  return (tuple(np.asarray(o) for o in out),
          jax.tree.map(lambda x: x[-1], states))


def _clear_of_bounds(values, bounds):
  """The test is only sound where no value lies at float32 rounding of its
  bound (a plateau's values equal to theirs, exact in float32 too, are
  sound); check it, so that a badly chosen sequence fails loudly."""
  finite = np.isfinite(bounds) & np.isfinite(values)
  gap = np.abs(values[finite] - bounds[finite])
  assert np.all((gap == 0) | (gap > 1e-5 * np.abs(bounds[finite])))


# -- Against the published rules ----------------------------------------------

WINDOW = 32


@pytest.mark.parametrize("kind", ["spikes", "plateau", "level"])
def test_matches_olmo_core_and_maxtext(kind):
  # Both compare with the sample deviation of the `window` earlier values,
  # from window // 2 values counting the current one: 15 earlier ones. No
  # floor under the deviation.
  losses, norms = _sequence(kind)
  ref = olmo_core_skips(losses, norms, WINDOW, 6.0)
  np.testing.assert_array_equal(maxtext_skips(losses, norms, WINDOW, 6.0), ref)
  rule = oc.SpikeWindow(window=WINDOW, num_std=6.0, ddof=1,
                        min_history=WINDOW // 2 - 1, std_floor=0.0)
  (skipped, *_), _ = _run(oc.skip_step(optax.sgd(0.1), rule=rule),
                          losses, norms)
  _, bounds = rolling_reference(losses, norms, rule)
  _clear_of_bounds(losses, bounds[:, 0])
  _clear_of_bounds(norms, bounds[:, 1])
  np.testing.assert_array_equal(skipped, ref)
  assert ref.any() and not ref.all()


# 16 losses alternating 0 and 1: mean 0.5, population deviation 0.5, sample
# deviation 0.5 * sqrt(16 / 15) = 0.516. With 2 deviations the bounds are
# 1.5 and 1.533: a loss of 1.52 is skipped by levanter's rule and taken by
# OLMo-core's and MaxText's.
_ALTERNATING = np.array([0.0, 1.0] * 8 + [1.52], np.float32)


def test_sample_and_population_references_differ():
  norms = np.ones(17, np.float32)
  olmo = olmo_core_skips(_ALTERNATING, norms, 16, 2.0)
  np.testing.assert_array_equal(maxtext_skips(_ALTERNATING, norms, 16, 2.0),
                                olmo)
  lev = levanter_skips(_ALTERNATING, norms, 16, 2.0)
  assert not olmo[-1] and lev[-1]


@pytest.mark.parametrize("ddof, reference", [(1, olmo_core_skips),
                                             (0, levanter_skips)],
                         ids=["sample", "population"])
def test_sample_or_population_deviation(ddof, reference):
  norms = np.ones(17, np.float32)
  ref = reference(_ALTERNATING, norms, 16, 2.0)
  rule = oc.SpikeWindow(window=16, num_std=2.0, ddof=ddof, min_history=7,
                        std_floor=0.0)
  (skipped, *_), _ = _run(oc.skip_step(optax.sgd(0.1), rule=rule),
                          _ALTERNATING, norms)
  np.testing.assert_array_equal(skipped[8:], ref[8:])
  assert skipped[-1] == (ddof == 0)


@pytest.mark.parametrize("kind", ["spikes", "level"])
def test_matches_levanter(kind):
  # levanter: population deviation from window // 2 earlier values. Its
  # floor (1e-6, absolute) never binds on these noisy sequences.
  losses, norms = _sequence(kind, seed=3)
  ref = levanter_skips(losses, norms, WINDOW, 6.0)
  rule = oc.SpikeWindow(window=WINDOW, std_floor=0.0)
  (skipped, *_), _ = _run(oc.skip_step(optax.sgd(0.1), rule=rule),
                          losses, norms)
  np.testing.assert_array_equal(skipped, ref)
  assert ref.any()


@pytest.mark.parametrize("rule", [
    oc.SpikeWindow(window=WINDOW),
    oc.SpikeWindow(window=WINDOW, num_std=3.0, two_sided=True, ddof=1),
    oc.SpikeWindow(window=16, min_history=5, watch="loss"),
    oc.SpikeWindow(window=WINDOW, watch="norm", std_floor=0.05),
], ids=["default", "two-sided", "loss", "norm"])
@pytest.mark.parametrize("kind", [
    "spikes", pytest.param("plateau", marks=pytest.mark.slow), "nan"])
def test_matches_the_generic_reference(rule, kind):
  losses, norms = _sequence("plateau" if kind == "plateau" else "spikes")
  if kind == "nan":
    losses[[20, 70, 71]] = [np.nan, np.inf, np.nan]
    norms[[40, 120]] = [np.nan, np.inf]
  (skipped, loss_bound, threshold, first), _ = _run(
      oc.skip_step(optax.sgd(0.1), rule=rule), losses, norms)
  ref, bounds = rolling_reference(losses, norms, rule)
  if kind == "nan" and rule.watch == "loss":
    ref |= ~np.isfinite(norms)  # The non-finite gradients' own rule.
  _clear_of_bounds(losses, bounds[:, 0])
  _clear_of_bounds(norms, bounds[:, 1])
  np.testing.assert_array_equal(skipped, ref)
  np.testing.assert_allclose(threshold, bounds[:, 1], rtol=2e-5)
  if rule.watch != "norm":
    np.testing.assert_allclose(loss_bound, bounds[:, 0], rtol=2e-5)
  # A skipped step's update is zero; a taken one is sgd's.
  np.testing.assert_array_equal(first[skipped], 0.0)
  np.testing.assert_allclose(first[~skipped], -0.1 * norms[~skipped],
                             rtol=1e-6)


@jax.jit
def _window_run(losses, norms, num_std, std_floor):
  """A SpikeWindow(window=16) of traced num_std and std_floor: one
  compilation for every value."""
  rule = oc.SpikeWindow(window=16, num_std=num_std, std_floor=std_floor)
  _, states = _scan(oc.skip_step(optax.sgd(0.1), rule=rule), losses, norms)
  return states.skipped, states.loss_threshold, states.stats.threshold


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16),
       num_std=st.sampled_from([1.5, 3.0, 6.0]),
       std_floor=st.sampled_from([0.0, 1e-3, 0.05]))
def test_traced_fields_match_the_generic_reference(seed, num_std, std_floor):
  rng = np.random.default_rng(seed)
  losses = 2.0 + 0.1 * rng.standard_normal(64)
  norms = np.exp(0.2 * rng.standard_normal(64))
  losses[rng.choice(64, 3, replace=False)] *= 3.0
  norms[rng.choice(64, 3, replace=False)] *= 10.0
  losses, norms = losses.astype(np.float32), norms.astype(np.float32)
  skipped, loss_bound, threshold = _window_run(
      losses, norms, jnp.float32(num_std), jnp.float32(std_floor))
  rule = oc.SpikeWindow(window=16, num_std=num_std, std_floor=std_floor)
  ref, bounds = rolling_reference(losses, norms, rule)
  # Compare up to the first value too close to its bound for float32 and
  # float64 to agree.
  values = np.stack([losses, norms], 1)
  with np.errstate(invalid="ignore"):
    close = np.any(np.isfinite(bounds) & (np.abs(values - bounds)
                                          < 1e-5 * np.abs(bounds)), axis=1)
  n = int(np.argmax(close)) if close.any() else len(ref)
  np.testing.assert_array_equal(np.asarray(skipped)[:n], ref[:n])
  np.testing.assert_allclose(np.asarray(loss_bound)[:n], bounds[:n, 0],
                             rtol=2e-5)
  np.testing.assert_allclose(np.asarray(threshold)[:n], bounds[:n, 1],
                             rtol=2e-5)


@pytest.mark.parametrize("kind", ["spikes", "plateau", "level"])
def test_references_agree_with_the_generic_one(kind):
  # The generic reference, set as each published rule, reproduces it on
  # finite sequences: the transcriptions check one another.
  losses, norms = _sequence(kind, seed=5)
  olmo = oc.SpikeWindow(window=WINDOW, ddof=1, min_history=15, std_floor=0.0)
  np.testing.assert_array_equal(
      rolling_reference(losses, norms, olmo)[0] if kind != "plateau"
      else olmo_core_skips(losses, norms, WINDOW, 6.0),
      olmo_core_skips(losses, norms, WINDOW, 6.0))
  lev = oc.SpikeWindow(window=WINDOW, std_floor=0.0)
  if kind != "plateau":
    np.testing.assert_array_equal(rolling_reference(losses, norms, lev)[0],
                                  levanter_skips(losses, norms, WINDOW, 6.0))


# -- Edge cases ---------------------------------------------------------------


def test_empty_window_takes_every_finite_step():
  # Before min_history values are in, nothing finite is skipped, however
  # large, and the bounds read inf.
  rule = oc.SpikeWindow(window=8)
  losses = np.array([1.0, 1e6, 2.0, 1e30], np.float32)
  norms = np.array([1.0, 1e3, 1.0, 1e20], np.float32)
  (skipped, loss_bound, threshold, _), state = _run(
      oc.skip_step(optax.sgd(0.1), rule=rule), losses, norms)
  assert not skipped.any()
  assert np.all(np.isinf(loss_bound)) and np.all(np.isinf(threshold))
  np.testing.assert_array_equal(state.history_count, [4, 4])


def test_constant_loss_and_a_tiny_rise():
  # A window of equal losses has deviation 0. The default floor,
  # 1e-3 * |mean|, lets a rise of 1e-4 through and skips one of 1%;
  # without a floor (OLMo-core, MaxText) the tiny rise is skipped too. Both
  # floors run in one compiled, vmapped scan.
  losses = np.full(40, 2.0, np.float32)
  losses[[30, 35]] = [2.0002, 2.02]
  norms = np.ones(40, np.float32)

  def skipped(floor):
    rule = oc.SpikeWindow(window=16, std_floor=floor)
    return _scan(oc.skip_step(optax.sgd(0.1), rule=rule), losses,
                 norms)[1].skipped

  out = jax.jit(jax.vmap(skipped))(jnp.array([1e-3, 0.0]))
  assert list(np.flatnonzero(out[0])) == [35]
  assert list(np.flatnonzero(out[1])) == [30, 35]


def test_nan_loss_is_skipped_and_stays_out_of_the_window():
  # Even in the warm-up; the window then holds the finite losses alone, so
  # the steps after it are judged as if it never came. (In the published
  # rules a NaN enters the window, and every step is skipped until it
  # leaves.)
  losses, norms = _sequence("spikes", n=120, seed=7)
  bad = losses.copy()
  bad[[3, 50]] = np.nan
  rule = oc.SpikeWindow(window=WINDOW)
  opt = oc.skip_step(optax.sgd(0.1), rule=rule)
  (skipped, *_), state = _run(opt, bad, norms)
  assert skipped[3] and skipped[50]
  keep = np.isfinite(bad)
  (skipped_ref, *_), state_ref = _run(opt, losses[keep], norms[keep])
  np.testing.assert_array_equal(skipped[keep], skipped_ref)
  np.testing.assert_array_equal(state.history[0], state_ref.history[0])
  assert olmo_core_skips(bad, norms, WINDOW, 6.0)[50:50 + WINDOW].all()


def test_level_change_becomes_the_baseline():
  # A lasting rise of the norm (x8): the moving-average rule (SpikeEMA)
  # with follow=False compares with the steps taken alone and skips every
  # step after it; the rolling window takes in the skipped norms too and
  # adapts within a few steps (as SpikeEMA's default does: test_lockin).
  losses, norms = _sequence("level", seed=2)
  (skipped_ema, *_), _ = _run(oc.skip_step(optax.sgd(0.1), rule=oc.SpikeEMA(
      max_ratio=5.0, follow=False)), losses, norms)
  rule = oc.SpikeWindow(window=128, watch="norm")
  (skipped, *_), _ = _run(oc.skip_step(optax.sgd(0.1), rule=rule),
                          losses, norms)
  assert skipped_ema[150:].all()
  assert 0 < skipped[150:].sum() <= 5 and not skipped[160:].any()
  np.testing.assert_array_equal(skipped,
                                rolling_reference(losses, norms, rule)[0])


def test_missing_or_non_scalar_loss_is_a_clear_error():
  opt = oc.skip_step(optax.sgd(0.1), rule=oc.SpikeWindow())
  params = {"w": jnp.ones(2)}
  state = opt.init(params)
  with pytest.raises(ValueError, match=r"loss=loss.*watch='norm'"):
    opt.update(params, state, params)
  with pytest.raises(ValueError, match="loss must be a scalar"):
    opt.update(params, state, params, loss=jnp.ones(3))
  # Watching the norm alone needs no loss.
  norm_only = oc.skip_step(optax.sgd(0.1),
                           rule=oc.SpikeWindow(watch="norm"))
  _, s = norm_only.update(params, norm_only.init(params), params)
  assert s.loss is None and s.loss_threshold is None
  assert s.history.shape == (2, 128)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"window": 1}, ValueError, "window"),
    ({"window": 8.0}, TypeError, "window"),
    ({"num_std": 0.0}, ValueError, "num_std"),
    ({"min_history": 1}, ValueError, "min_history"),
    ({"min_history": 200}, ValueError, "min_history=200 exceeds window"),
    ({"watch": "grad"}, ValueError, r"watch='grad' is not one of"),
    ({"watch": "grad_norm"}, ValueError, r"watch='grad_norm' is now"
     r" watch='norm'"),
    ({"two_sided": 1}, TypeError, "two_sided"),
    ({"ddof": 2}, ValueError, "ddof"),
    ({"std_floor": -1.0}, ValueError, "std_floor"),
])
def test_bad_rule_fields(kwargs, error, match):
  with pytest.raises(error, match=match):
    oc.skip_step(optax.sgd(0.1), rule=oc.SpikeWindow(**kwargs))


@pytest.mark.parametrize("spike", [oc.SpikeWindow(), oc.SpikeEMA()],
                         ids=["window", "ema"])
def test_a_spike_rule_alone_can_skip(spike):
  # With nonfinite=False, a spike rule alone is a rule that can skip.
  opt = oc.skip_step(optax.sgd(0.1), nonfinite=False, rule=spike)
  assert isinstance(opt, optax.GradientTransformationExtraArgs)


# -- The guarantee, jit, MultiSteps, devices ----------------------------------


def _grads(n, seed=0):
  rng = np.random.default_rng(seed)
  return [{"w": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32),
           "b": jnp.asarray(rng.standard_normal(2), jnp.float32)}
          for _ in range(n)]


def _apply(opt, params, state, grads, **extra):
  updates, state = opt.update(grads, state, params, **extra)
  return optax.apply_updates(params, updates), state


def test_skipped_steps_leave_the_inner_state_untouched():
  # The run with spiking batches equals, bit for bit, AdamW run on the
  # batches that were taken.
  losses, _ = _sequence("spikes", n=64, seed=4)
  grads = _grads(64)
  inner = optax.chain(oc.clip_by_global_norm(1.0), optax.adamw(1e-2))
  opt = oc.skip_step(inner, rule=oc.SpikeWindow(window=16))
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  step = jax.jit(lambda p, s, g, x: _apply(opt, p, s, g, loss=x))
  inner_step = jax.jit(lambda p, s, g: _apply(inner, p, s, g))
  state, p_ref, s_ref, skipped = opt.init(params), params, inner.init(params), 0
  p = params
  for g, loss in zip(grads, losses):
    before = state.inner_state
    p, state = step(p, state, g, loss)
    if bool(state.skipped):
      skipped += 1
      assert_bitwise_equal(state.inner_state, before)
    else:
      p_ref, s_ref = inner_step(p_ref, s_ref, g)
  assert skipped >= 1  # The loss spikes at step 60.
  assert_bitwise_equal(p, p_ref)
  assert_bitwise_equal(state.inner_state, s_ref)


def test_eager_equals_jit_and_traces_once():
  losses, norms = _sequence("spikes", n=24)
  losses[20] = 10.0
  opt = oc.skip_step(optax.adam(0.1), rule=oc.SpikeWindow(window=8))
  params = {"w": jnp.zeros(2)}
  traces = []

  def step(s, g, loss):
    traces.append(1)
    return opt.update(g, s, params, loss=loss)

  jitted = jax.jit(step)
  s_jit = s_eager = opt.init(params)
  for loss, norm in zip(losses, norms):
    g = {"w": jnp.array([norm, 0.0])}
    _, s_jit = jitted(s_jit, g, loss)
    _, s_eager = opt.update(g, s_eager, params, loss=loss)
  assert len(traces) == 1
  assert_bitwise_equal(s_jit, s_eager)
  assert int(s_jit.num_skipped) > 0


def test_multisteps_inside_judges_each_micro_batch():
  # skip_step(MultiSteps(opt, 2)): the window holds micro-batch losses and
  # norms, and a spiking micro-batch is dropped alone.
  losses, norms = _sequence("spikes", n=100, seed=1)
  inner = optax.MultiSteps(optax.sgd(0.1), 2)
  rule = oc.SpikeWindow(window=WINDOW)
  (skipped, *_), state = _run(oc.skip_step(inner, rule=rule), losses, norms)
  np.testing.assert_array_equal(skipped,
                                rolling_reference(losses, norms, rule)[0])
  assert int(state.inner_state.gradient_step) == (100 - skipped.sum()) // 2


def test_multisteps_outside_judges_the_accumulated_norm():
  # The accumulated gradients' norm alone: judged once per step.
  params = {"w": jnp.ones(2)}
  opt = optax.MultiSteps(oc.skip_step(
      optax.sgd(0.1), nonfinite=False,
      rule=oc.SpikeWindow(window=4, watch="norm")), 2)
  state = opt.init(params)
  update = jax.jit(opt.update)
  for _ in range(6):
    _, state = update(params, state, params)
  np.testing.assert_array_equal(state.inner_opt_state.history_count, [0, 3])


def test_sharded_over_every_device_decides_as_on_one():
  losses, norms = _sequence("spikes", n=24)
  norms[20] = 5.0
  rule = oc.SpikeWindow(window=16)
  opt = oc.skip_step(optax.adam(0.1), rule=rule)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
  n = jax.device_count()
  params = {"w": jax.device_put(jnp.zeros(2 * n), sharded)}
  state = opt.init(params)
  step = jax.jit(lambda s, g, x: opt.update(g, s, params, loss=x)[1])
  skipped = []
  for loss, norm in zip(losses, norms):
    g = jnp.zeros(2 * n).at[0].set(norm)
    state = step(state, {"w": jax.device_put(g, sharded)}, loss)
    skipped.append(bool(state.skipped))
  np.testing.assert_array_equal(skipped,
                                rolling_reference(losses, norms, rule)[0])
  assert skipped[20]


def test_shard_map_averages_each_devices_loss():
  from jax.sharding import PartitionSpec as P
  n = jax.device_count()
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
  opt = oc.skip_step(optax.sgd(1.0), axis_name="d",
                     rule=oc.SpikeWindow(window=4, watch="loss"))

  def local(g, loss):
    state = opt.init(g)
    _, state = opt.update(g, state, loss=loss[0])
    return state.loss[None]

  losses = jnp.arange(float(n))
  out = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("d"), P("d")),
                              out_specs=P("d")))(jnp.ones((n, 2)), losses)
  np.testing.assert_allclose(np.asarray(out), float(losses.mean()))


def test_clip_stats_keys():
  params = {"w": jnp.ones(2)}
  plain = oc.skip_step(optax.sgd(0.1))
  keys = set(oc.clip_stats(plain.init(params), scalars=True))
  assert keys == {"skip_step/count", "skip_step/norm", "skip_step/threshold",
                  "skip_step/scale", "skip_step/skipped",
                  "skip_step/num_skipped", "skip_step/norm_ema"}
  rolling = oc.skip_step(optax.sgd(0.1), rule=oc.SpikeWindow())
  state = rolling.init(params)
  _, state = rolling.update(params, state, params, loss=jnp.float32(2.5))
  stats = oc.clip_stats(state, scalars=True)
  assert set(stats) == keys | {"skip_step/loss", "skip_step/loss_threshold"}
  assert float(stats["skip_step/loss"]) == 2.5
  assert {"skip_step/history", "skip_step/history_count"} <= set(
      oc.clip_stats(state))


def test_flax_nnx_optimizer_passes_the_loss():
  # nnx.Optimizer gives init the Param-wrapped state and update the bare
  # gradients: the tree check sees the same leaves; the loss reaches the
  # rule as an extra argument of nnx.Optimizer.update.
  nnx = pytest.importorskip("flax.nnx")
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, oc.skip_step(
      optax.sgd(0.1), rule=oc.SpikeWindow(window=4, min_history=2)),
      wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, scale):
    def loss_fn(m):
      return scale * jnp.mean(m(jnp.ones((4, 3))) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads, loss=loss)
    return loss

  for scale in (1.0, 1.01, 0.99, 1.0, 50.0):
    loss = step(model, opt, scale)
  stats = oc.clip_stats(opt.opt_state, scalars=True)
  assert float(stats["skip_step/loss"]) == pytest.approx(float(loss))
  assert bool(stats["skip_step/skipped"])
