"""Lock-in: every adaptive default follows a lasting change of the norm level.

Synthetic runs, as in issue 30: a 100-float gradient whose norm follows a
level with 1%, 5% or 10% multiplicative noise for 1000 steps; at step 100
the level changes for good (x1.5, x3, x10, x0.5), or it drifts x10 over the
run, or it stays put with three planted x20 spikes. Every method's default
must (a) recover within 100 steps: a 50-step window holding at most 5
percentage points more clipped (or skipped) steps than the method clips in
a steady run (its design rate), (b) stay within those 5 points over the
last 500 steps, (c) catch every planted spike, clipping no more other steps
than the published rule does; and the published rule (``follow=False``)
must still lock in, so the option is real.

All scenarios and noise levels of the defaults run in one jitted
``lax.scan``, vmapped over the runs (one compile, the fast tier); the
published rules and the package form of ``clip_by_quantile`` in a second
one (the slow tier). ``python tests/test_lockin.py`` prints the table the
docstrings quote.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc

STEPS, CHANGE, SPIKES = 1000, 100, (300, 500, 700)
SCENARIOS = ("steady", "x1.5", "x3", "x10", "x0.5", "drift", "spikes")
NOISES = (0.01, 0.05, 0.10)
SEED = 0


def norms(scenario: str, noise: float, seed: int = SEED) -> np.ndarray:
  """The norm at each step, float64."""
  t = np.arange(STEPS)
  level = np.ones(STEPS)
  if scenario.startswith("x"):
    level[CHANGE:] = float(scenario[1:])
  elif scenario == "drift":
    level = 10.0 ** (t / STEPS)
  g = level * np.exp(noise * np.random.default_rng(seed).standard_normal(STEPS))
  if scenario == "spikes":
    g[list(SPIKES)] *= 20.0
  return g


def _skip(rule):
  return oc.skip_step(optax.identity(), rule=rule)


# name -> (the default, the published rule or None, which state field flags
# a clipped or skipped step, the design rate's source: "steady" run).
METHODS = {
    "zclip": (lambda: oc.zclip(), lambda: oc.zclip(oc.ZScore(follow=False))),
    "adagc": (lambda: oc.adagc(), lambda: oc.adagc(follow=False)),
    "clip_by_quantile": (lambda: oc.clip_by_quantile(),
                         lambda: oc.clip_by_quantile(follow=False)),
    "clip_by_quantile(include_current=False)": (
        lambda: oc.clip_by_quantile(include_current=False),
        lambda: oc.clip_by_quantile(include_current=False, follow=False)),
    "skip_step(SpikeEMA)": (lambda: _skip(oc.SpikeEMA()),
                            lambda: _skip(oc.SpikeEMA(follow=False))),
    "skip_step(SpikeWindow)": (lambda: _skip(oc.SpikeWindow(watch="norm")),
                               None),
}
# The published rules' lasting change they cannot follow.
LOCKS_IN_ON = {"zclip": "x3", "adagc": "x3", "clip_by_quantile": "drift",
               "clip_by_quantile(include_current=False)": "drift",
               "skip_step(SpikeEMA)": "x10"}
# Measured misses of a default, with the largest share that stays a miss
# rather than a regression (see adagc's docstring: its 0.98 EMA lags a
# steady rise of x10 per 1000 steps by more than max_ratio's 5%).
MISSES = {("adagc", "drift"): 0.3}


def _flag(state):
  return state.skipped if hasattr(state, "skipped") else state.stats.clipped


SLOW = {"clip_by_quantile(include_current=False)"}


def _slow(name: str) -> bool:
  return name.endswith(" follow=False") or name in SLOW


def flags(name: str) -> np.ndarray:
  """The clipped (or skipped) flags of ``name``, ``[noise, scenario,
  step]``."""
  return _flags(_slow(name))[name]


@functools.cache
def _flags(slow: bool) -> dict[str, np.ndarray]:
  """Each transformation's flags, from one jitted scan over every run."""
  txs = {}
  for name, (default, published) in METHODS.items():
    if _slow(name) == slow:
      txs[name] = default()
    if published is not None and slow:
      txs[name + " follow=False"] = published()
  direction = jnp.ones(100) / 10.0  # Unit norm.
  runs = np.stack([[norms(s, n) for s in SCENARIOS] for n in NOISES])

  def run(seq):
    g0 = direction * seq[0]
    states = {k: tx.init(g0) for k, tx in txs.items()}

    def step(states, norm):
      g = direction * norm
      new = {k: tx.update(g, states[k], g)[1] for k, tx in txs.items()}
      return new, {k: _flag(s) for k, s in new.items()}

    return jax.lax.scan(step, states, seq)[1]

  out = jax.jit(jax.vmap(jax.vmap(run)))(jnp.asarray(runs, jnp.float32))
  return {k: np.asarray(v) for k, v in out.items()}


def measure(c: np.ndarray, steady: np.ndarray) -> dict[str, float]:
  """Share clipped in the last 500 steps, steps to recover (inf: never),
  the design rate (share of a steady run clipped after step 100)."""
  design = float(steady[CHANGE:].mean())
  windows = np.convolve(c[CHANGE:].astype(float), np.ones(50) / 50, "valid")
  ok = np.flatnonzero(windows <= design + 0.05)
  return dict(last=float(c[500:].mean()), design=design,
              recover=float(ok[0]) if ok.size else np.inf)


def _slow_if(name):
  return [pytest.mark.slow] if _slow(name) else []


def _cases():
  for name in METHODS:
    for s in SCENARIOS[1:6]:
      yield pytest.param(name, s, marks=_slow_if(name))


@pytest.mark.parametrize("noise", range(len(NOISES)),
                         ids=[f"noise{n}" for n in NOISES])
@pytest.mark.parametrize("name, scenario", list(_cases()))
def test_the_default_follows_a_lasting_change(name, scenario, noise):
  f = flags(name)[noise]
  m = measure(f[SCENARIOS.index(scenario)], f[0])
  if (name, scenario) in MISSES:
    assert m["last"] <= MISSES[name, scenario], m
    return
  assert m["recover"] <= 100, m
  assert m["last"] <= m["design"] + 0.05, m


@pytest.mark.parametrize("noise", range(len(NOISES)),
                         ids=[f"noise{n}" for n in NOISES])
@pytest.mark.parametrize("name", [pytest.param(n, marks=_slow_if(n))
                                  for n in METHODS])
def test_every_spike_is_caught(name, noise):
  c = flags(name)[noise, SCENARIOS.index("spikes")]
  assert c[list(SPIKES)].all()
  # Other steps: at most 5 points above the steady run's rate.
  steady = flags(name)[noise, 0, CHANGE:].mean()
  assert c[CHANGE:].mean() <= steady + 0.05


@pytest.mark.slow
@pytest.mark.parametrize("noise", range(len(NOISES)),
                         ids=[f"noise{n}" for n in NOISES])
@pytest.mark.parametrize("name", list(LOCKS_IN_ON))
def test_no_more_false_positives_than_the_published_rule(name, noise):
  c = flags(name)[noise, SCENARIOS.index("spikes")]
  before = flags(name + " follow=False")[noise, SCENARIOS.index("spikes")]
  others = np.ones(STEPS, bool)
  others[list(SPIKES)] = False
  # Up to a point of the steps: a quantile's 10% design rate scatters.
  assert c[others].sum() <= before[others].sum() + 0.01 * others.sum()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LOCKS_IN_ON))
def test_the_published_rule_still_locks_in(name):
  f = flags(name + " follow=False")[0]
  m = measure(f[SCENARIOS.index(LOCKS_IN_ON[name])], f[0])
  assert m["last"] > 0.9 and m["recover"] == np.inf, m


def table() -> str:
  """The measured shares and recoveries, one row per method and noise."""
  rows = ["| method | noise | steady | " + " | ".join(SCENARIOS[1:6])
          + " | x20 spikes caught, other steps clipped |",
          "|---" * 8 + "|---|"]
  for name, fl in {**_flags(False), **_flags(True)}.items():
    for i, noise in enumerate(NOISES):
      f = fl[i]
      cells = []
      for s in SCENARIOS[1:6]:
        m = measure(f[SCENARIOS.index(s)], f[0])
        rec = "never" if np.isinf(m["recover"]) else f"{m['recover']:.0f}"
        cells.append(f"{100 * m['last']:.1f}%, {rec}")
      sp = f[SCENARIOS.index("spikes")]
      caught = int(sp[list(SPIKES)].sum())
      rows.append(f"| `{name}` | {noise:.0%} | {100 * f[0][CHANGE:].mean():.1f}%"
                  f" | " + " | ".join(cells)
                  + f" | {caught}/3, {int(sp[CHANGE:].sum()) - caught} |")
  return "\n".join(rows)


if __name__ == "__main__":
  print("Share of the last 500 steps clipped or skipped, and steps after the"
        " change until a 50-step window holds at most 5 points more than"
        " the steady run (seed 0).")
  print(table())
