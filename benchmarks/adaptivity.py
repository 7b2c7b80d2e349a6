"""``python -m benchmarks.adaptivity [--quick]``: lock-in after a lasting change.

An adaptive clipper should pull back the rare spike and let the norm level
move when training moves it (warm-up, learning-rate decay, batch-size ramps,
data mixtures). This benchmark measures whether each one does, on synthetic
runs where the norm is set step by step, and on the transformer task of
``benchmarks/_stability_tasks.py``.

**Scenarios.** A 100-float gradient, its direction drawn afresh each step
and its global norm set to ``level(t) * (1 + noise * e_t)``, ``e_t`` standard
normal, at ``noise`` 1%, 5% and 10%; 1000 steps at level 0.5 (below
``adagc``'s warm-up cap of 1.0), changed at step 100 for good: ``rise x1.5``, ``rise x3``,
``rise x10``, ``fall x0.5``; ``drift x10``, a geometric rise by x10 from
step 100 to the last step; and ``steady``, no change. In every scenario three
spikes of 20 times the level are planted at steps 300, 600 and 900. The
noise draws and the directions are the same in every scenario.

**Measures**, per run (a scenario at a noise level and seed):

- *share*: the share of the last 500 steps clipped or skipped, the planted
  spikes left out;
- *recovery*: the steps from the change until the first 50-step window
  (spikes left out) holds fewer clipped or skipped steps than the method's
  design rate plus 5 points (5% for every method but ``clip_by_quantile``,
  which clips ``1 - quantile`` of the steps by design: 15% at 0.9); *never*
  if no window after the change does;
- *spikes caught*: planted spikes clipped or skipped so that what passes is
  at most twice the median norm of the 20 steps before;
- *false positives*: in ``steady``, the steps clipped or skipped that are
  not spikes (warm-ups included).

A method *meets the target* at a noise level when, in every scenario with a
change, its share is at most its design rate plus 5 points and it recovers
within 100 steps, and it catches the three spikes of ``steady``.

**Methods.** Every adaptive transform of optaxclip at its defaults and with
``follow=False`` (the rule as published; ``skip_step``'s rules around
``optax.identity()``; ``clip_update_by_history`` after
``optax.scale_by_adam()``, judging Adam's update), and float64 NumPy
transcriptions of the published rules (``benchmarks/_adaptivity_references.py``:
ZClip's and AdaGC's reference code, AutoClip's paper code and package,
levanter's update clipping and skip rule) run on the same norms. Each
optaxclip method runs every scenario in one jitted program: a ``lax.scan``
over the steps, ``vmap``-ped over the runs.

**Real case.** The character-level transformer of the stability benchmark
(AdamW, warm-up then cosine decay) at peak learning rate 0.3, where its
gradient norm falls to about 0.4 by step 20 and then rises about three-fold,
with each clipper before AdamW (at its defaults; ``zclip`` and ``adagc``
also with ``follow=False``), against ``clip_by_global_norm(1.0)`` and no
clipping, 300 steps, 2 seeds in one program: the share of steps clipped or
skipped after the learning-rate warm-up and the final held-out loss.
``--no-real --keep-real`` reruns the synthetic part and keeps the real case
already written.

Writes ``benchmarks/results/adaptivity-<platform>.{json,md,png}`` (the
figure copied to ``docs/figures/adaptivity.png`` by the default run) and
prints the tables. ``--quick`` (300 steps, one seed, the change at step 60,
no real case) writes ``adaptivity-<platform>-quick.*``.

Run from the repository root::

  python -m benchmarks.adaptivity          # synthetic runs and the real case
  python -m benchmarks.adaptivity --quick  # smoke test
  python -m benchmarks.adaptivity --no-real --seeds 5
  python -m benchmarks.adaptivity --no-real --keep-real
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaxclip as oc
from benchmarks import _adaptivity_references as refs
from benchmarks import stability

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
FIGURES = os.path.join(ROOT, "docs", "figures")

# ---------------------------------------------------------------------------
# Scenarios.

SCENARIOS = ("steady", "rise x1.5", "rise x3", "rise x10", "fall x0.5",
             "drift x10")
CHANGES = SCENARIOS[1:]
NOISES = (0.01, 0.05, 0.10)
STEPS = 1000
CHANGE = 100
BASE = 0.5
SPIKES = (300, 600, 900)  # At 30%, 60% and 90% of the run.
SPIKE_FACTOR = 20.0
DIM = 100

# --quick checks the harness: it compiles without XLA's backend
# optimizations, in about half the time.
QUICK_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}

# Measures.
LAST = 500
WINDOW = 50
MARGIN = 0.05
RECOVERY_LIMIT = 100
SPIKE_PASS = 2.0
SPIKE_CONTEXT = 20


def level(scenario: str, *, steps: int = STEPS, change: int = CHANGE,
          base: float = BASE) -> np.ndarray:
  """The norm level of ``scenario`` at each step, shape ``(steps,)``."""
  t = np.arange(steps)
  after = t >= change
  if scenario == "steady":
    return np.full(steps, base)
  if scenario.startswith(("rise x", "fall x")):
    factor = float(scenario.split("x", 1)[1])
    return np.where(after, base * factor, base)
  if scenario.startswith("drift x"):
    factor = float(scenario.split("x", 1)[1])
    frac = np.clip((t - change) / max(steps - 1 - change, 1), 0.0, 1.0)
    return base * factor ** frac
  raise ValueError(f"unknown scenario {scenario!r}; choose from {SCENARIOS}")


def norms(scenario: str, noise: float, seed: int, *, steps: int = STEPS,
          change: int = CHANGE, spikes: Sequence[int] | None = None,
          base: float = BASE) -> np.ndarray:
  """The gradient norm of each step: the level times ``1 + noise * e``, and
  ``SPIKE_FACTOR`` times the level at the ``spikes`` steps (default: 30%,
  60% and 90% of ``steps``); float64 ``(steps,)``. The draws ``e`` depend
  on ``seed`` alone."""
  lev = level(scenario, steps=steps, change=change, base=base)
  e = np.random.default_rng(seed).standard_normal(steps)
  out = lev * np.maximum(1.0 + noise * e, 1e-3)
  spikes = [s for s in (default_spikes(steps) if spikes is None else spikes)
            if s < steps]
  out[spikes] = SPIKE_FACTOR * lev[spikes]
  return out


class Grid(NamedTuple):
  """Every run of the benchmark: one row per (scenario, noise, seed)."""

  scenario: list[str]
  noise: list[float]
  seed: list[int]
  level: np.ndarray  # (runs, steps)
  norms: np.ndarray  # (runs, steps), float64
  steps: int
  change: int
  spikes: tuple[int, ...]
  last: int  # The steps whose share clipped is measured: the last ones.


def default_spikes(steps: int) -> tuple[int, ...]:
  """The spike steps: at 30%, 60% and 90% of the run."""
  return tuple(int(round(f * steps)) for f in (0.3, 0.6, 0.9))


def grid(*, scenarios: Sequence[str] = SCENARIOS,
         noises: Sequence[float] = NOISES, seeds: int = 1,
         steps: int = STEPS, change: int = CHANGE,
         spikes: Sequence[int] | None = None) -> Grid:
  """The runs, in the order scenario, then noise, then seed. ``spikes``
  defaults to 30%, 60% and 90% of ``steps``; the share clipped is measured
  over the last ``min(500, steps // 2)`` steps."""
  rows = [(s, n, k) for s in scenarios for n in noises for k in range(seeds)]
  spikes = tuple(s for s in (default_spikes(steps) if spikes is None
                             else spikes) if s < steps)
  return Grid(
      scenario=[r[0] for r in rows], noise=[r[1] for r in rows],
      seed=[r[2] for r in rows],
      level=np.stack([level(s, steps=steps, change=change) for s, _, _ in rows]),
      norms=np.stack([norms(s, n, k, steps=steps, change=change, spikes=spikes)
                      for s, n, k in rows]),
      steps=steps, change=change, spikes=spikes, last=min(LAST, steps // 2))


def gradients(g: Grid, *, dim: int = DIM) -> np.ndarray:
  """The gradients, float32 ``(runs, steps, dim)``: a direction drawn afresh
  each step (the same in every run of a seed) scaled to the run's norm."""
  out = np.empty(g.norms.shape + (dim,), np.float32)
  for seed in sorted(set(g.seed)):
    u = np.random.default_rng(10_000 + seed).standard_normal((g.steps, dim))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    rows = [i for i, k in enumerate(g.seed) if k == seed]
    out[rows] = (g.norms[rows][:, :, None] * u[None]).astype(np.float32)
  return out


# ---------------------------------------------------------------------------
# Measures, on one run: ``acted`` (steps,) bool, clipped or skipped.


def _keep(steps: int, spikes: Sequence[int]) -> np.ndarray:
  keep = np.ones(steps, bool)
  keep[[s for s in spikes if s < steps]] = False
  return keep


def share(acted: np.ndarray, spikes: Sequence[int], *, last: int = LAST
          ) -> float:
  """The share of the last ``last`` steps clipped or skipped, spikes out."""
  acted = np.asarray(acted, bool)
  keep = _keep(acted.size, spikes)[-last:]
  return float(np.mean(acted[-last:][keep]))


def recovery(acted: np.ndarray, change: int, spikes: Sequence[int], *,
             limit: float = MARGIN, window: int = WINDOW) -> int | None:
  """Steps from ``change`` to the first ``window``-step window (spikes out)
  whose share clipped or skipped is below ``limit``; None if none is."""
  acted = np.asarray(acted, bool)
  keep = _keep(acted.size, spikes)
  a = np.where(keep, acted, False).astype(float)
  k = keep.astype(float)
  ca, ck = np.concatenate([[0], np.cumsum(a)]), np.concatenate([[0],
                                                                np.cumsum(k)])
  starts = np.arange(change, acted.size - window + 1)
  frac = (ca[starts + window] - ca[starts]) / np.maximum(
      ck[starts + window] - ck[starts], 1)
  good = np.nonzero(frac < limit)[0]
  return int(good[0]) if good.size else None


def spikes_caught(acted: np.ndarray, scale: np.ndarray, norm: np.ndarray,
                  spikes: Sequence[int], *, factor: float = SPIKE_PASS,
                  context: int = SPIKE_CONTEXT) -> int:
  """Spikes clipped or skipped so that at most ``factor`` times the median
  norm of the ``context`` steps before passes."""
  caught = 0
  for s in spikes:
    if s >= norm.size:
      continue
    before = np.median(norm[max(0, s - context):s])
    caught += int(bool(acted[s]) and scale[s] * norm[s] <= factor * before)
  return caught


def false_positives(acted: np.ndarray, spikes: Sequence[int]) -> int:
  """Steps clipped or skipped that are not spikes."""
  acted = np.asarray(acted, bool)
  return int(np.sum(acted & _keep(acted.size, spikes)))


def measure(record: dict[str, np.ndarray], g: Grid, design: float
            ) -> list[dict[str, Any]]:
  """The measures of every run of ``g`` from a method's ``record``
  (``acted``, ``scale``, ``norm``: ``(runs, steps)``)."""
  out = []
  for i, scenario in enumerate(g.scenario):
    acted = np.asarray(record["acted"][i], bool)
    out.append({
        "scenario": scenario, "noise": g.noise[i], "seed": g.seed[i],
        "share": share(acted, g.spikes, last=g.last),
        "recovery": None if scenario == "steady" else recovery(
            acted, g.change, g.spikes, limit=design + MARGIN),
        "spikes_caught": spikes_caught(acted, record["scale"][i],
                                       record["norm"][i], g.spikes),
        "false_positives": false_positives(acted, g.spikes),
        "acted_total": int(np.sum(acted))})
  return out


# ---------------------------------------------------------------------------
# Methods.


class Method(NamedTuple):
  """An optaxclip method: its transformation, its design rate (the share
  of steps it clips when nothing changes: ``1 - quantile`` for
  ``clip_by_quantile``, else 0), and whether the figure shows it."""

  make: Callable[[], optax.GradientTransformation]
  design: float = 0.0
  main: bool = False
  note: str = ""


def methods() -> dict[str, Method]:
  """Every adaptive method of optaxclip at its defaults, and each rule as
  published (``follow=False``)."""
  def skip(rule):
    return lambda: oc.skip_step(optax.identity(), rule=rule)

  def quantile(**kw):
    return lambda: oc.clip_by_quantile(**kw)

  return {
      "zclip()": Method(oc.zclip, main=True),
      "zclip(ZScore(follow=False))": Method(
          lambda: oc.zclip(oc.ZScore(follow=False)), main=True),
      "zclip(ZScore(mode='percentile'))": Method(
          lambda: oc.zclip(oc.ZScore(mode="percentile"))),
      "adagc()": Method(oc.adagc, main=True),
      "adagc(follow=False)": Method(lambda: oc.adagc(follow=False),
                                    main=True),
      "clip_by_quantile()": Method(oc.clip_by_quantile, design=0.1,
                                   main=True),
      "clip_by_quantile(include_current=False)": Method(
          quantile(include_current=False), design=0.1),
      "clip_by_quantile(follow=False)": Method(quantile(follow=False),
                                               design=0.1, main=True),
      "clip_by_quantile(include_current=False, follow=False)": Method(
          quantile(include_current=False, follow=False), design=0.1),
      "skip_step(rule=SpikeEMA())": Method(skip(oc.SpikeEMA())),
      "skip_step(rule=SpikeEMA(follow=False))": Method(
          skip(oc.SpikeEMA(follow=False))),
      "skip_step(rule=SpikeWindow(watch='norm'))": Method(
          skip(oc.SpikeWindow(watch="norm"))),
      "chain(scale_by_adam(), clip_update_by_history())": Method(
          lambda: optax.chain(optax.scale_by_adam(),
                              oc.clip_update_by_history()),
          note="judges Adam's update, not the gradient: Adam divides a"
               " lasting change of the gradient's scale out of its update"
               " within a few steps, and a gradient spike reaches the"
               " update damped by the second moment"),
  }


class Reference(NamedTuple):
  """A float64 transcription of a published rule, on the gradient norms."""

  rule: Callable[..., dict[str, np.ndarray]]
  design: float = 0.0
  main: bool = False


def references() -> dict[str, Reference]:
  """The published rules, each at its source's defaults."""
  return {
      "ZClip (reference code)": Reference(refs.zclip),
      "AdaGC (official code)": Reference(refs.adagc),
      "AutoClip (paper code, 90th percentile)": Reference(
          refs.autoclip, design=0.1),
      "AutoClip (package QuantileClip)": Reference(refs.autoclip_package,
                                                  design=0.1),
      "levanter clip_update_by_historical_norm": Reference(refs.levanter_clip),
      "levanter SkipStep (norm)": Reference(refs.levanter_skip),
  }


def _record(state: Any) -> dict[str, jax.Array]:
  """The watched norm, the threshold, the factor and whether it acted, from
  the one optaxclip state in ``state``."""
  stats = oc.clip_stats(state)
  names = sorted({k.split("/")[0] for k in stats})
  if len(names) != 1:
    raise ValueError(f"expected one optaxclip transform, found {names}")
  name = names[0]
  threshold = stats.get(f"{name}/threshold")
  if threshold is None:  # adagc: per-tensor thresholds; one tensor here.
    threshold = jax.tree.leaves(stats[f"{name}/leaf_thresholds"])[0]
  acted = stats.get(f"{name}/skipped", stats.get(f"{name}/clipped"))
  frac = stats.get(f"{name}/frac_clipped", acted.astype(jnp.float32))
  return {"norm": stats[f"{name}/norm"], "threshold": jnp.asarray(threshold),
          "scale": stats[f"{name}/scale"], "acted": acted,
          "frac": jnp.asarray(frac, jnp.float32)}


def run_method(method: Method, grads: np.ndarray, *,
               compiler_options: dict[str, Any] | None = None
               ) -> dict[str, np.ndarray]:
  """Every run at once: ``vmap`` over the runs of a ``lax.scan`` over the
  steps; ``(runs, steps)`` host arrays of the watched norm, the threshold,
  the factor and whether the step was clipped or skipped."""
  tx = method.make()

  def one(g):
    state = tx.init(g[0])

    def step(state, gt):
      _, state = tx.update(gt, state, gt)
      return state, _record(state)

    return jax.lax.scan(step, state, g)[1]

  x = jnp.asarray(grads)
  out = jax.jit(jax.vmap(one)).lower(x).compile(compiler_options)(x)
  return {k: np.asarray(v, np.float64 if k != "acted" else bool)
          for k, v in jax.device_get(out).items()}


def run_reference(ref: Reference, g: Grid) -> dict[str, np.ndarray]:
  out = ref.rule(g.norms)
  return {"norm": g.norms, "threshold": out["threshold"],
          "scale": out["scale"], "acted": out["clipped"]}


# ---------------------------------------------------------------------------
# Summaries.


def summarize(runs: list[dict[str, Any]], design: float,
              noises: Sequence[float], num_spikes: int) -> dict[str, Any]:
  """Per noise level and scenario: the share (mean over seeds), the
  recovery (the slowest seed; None if a seed never recovers), spikes caught
  and false positives (sums over seeds); and whether the target is met."""
  out: dict[str, Any] = {}
  for noise in noises:
    cells: dict[str, Any] = {}
    for scenario in SCENARIOS:
      rs = [r for r in runs if r["noise"] == noise
            and r["scenario"] == scenario]
      if not rs:
        continue
      rec = [r["recovery"] for r in rs]
      cells[scenario] = {
          "share": float(np.mean([r["share"] for r in rs])),
          "recovery": (None if any(x is None for x in rec) else max(rec))
          if scenario != "steady" else None,
          "recovered": scenario == "steady" or all(x is not None
                                                   for x in rec),
          "spikes_caught": int(sum(r["spikes_caught"] for r in rs)),
          "false_positives": int(sum(r["false_positives"]
                                                  for r in rs)),
          "spikes": num_spikes * len(rs), "seeds": len(rs)}
    ok = True
    for scenario, c in cells.items():
      if scenario == "steady":
        continue
      ok &= (c["recovered"] and c["recovery"] is not None
             and c["recovery"] <= RECOVERY_LIMIT
             and c["share"] <= design + MARGIN + 1e-12)
    steady = cells.get("steady")
    if steady is not None:
      ok &= steady["spikes_caught"] == steady["spikes"]
    out[f"{noise:g}"] = {"scenarios": cells, "meets_target": bool(ok)}
  return out


def _pct(x: float) -> str:
  if x == 0:
    return "0%"
  if x >= 0.995 and x < 1:
    return "99%"
  return f"{100 * x:.1f}%" if x < 0.1 else f"{100 * x:.0f}%"


def cell(c: dict[str, Any]) -> str:
  """``share, recovery`` as in the tables: ``0.6%, 38`` or ``100%, never``."""
  rec = c["recovery"]
  return f"{_pct(c['share'])}, {'never' if rec is None else rec}"


def table(header: list[str], rows: list[list[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]
  return "\n".join(lines)


# ---------------------------------------------------------------------------
# Figure.

FIG_COLORS = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9"]


def figure(path: str, g: Grid, records: dict[str, dict[str, np.ndarray]],
           labels: list[str], noise: float) -> None:
  """One panel per scenario at ``noise`` (seed 0): the norm, each method's
  threshold, and its clipped or skipped steps as ticks under the curves."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  scenarios = [s for s in SCENARIOS if s in g.scenario]
  cols = 3
  rows = -(-len(scenarios) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.4 * rows),
                           squeeze=False)
  t = np.arange(g.steps)
  for ax, scenario in zip(axes.flat, scenarios):
    i = next(k for k in range(len(g.scenario)) if g.scenario[k] == scenario
             and g.noise[k] == noise and g.seed[k] == 0)
    n = g.norms[i]
    ax.plot(t, n, color="0.65", lw=0.6, label="gradient norm")
    low = float(np.min(n)) * 0.6
    families: list[str] = []
    for j, label in enumerate(labels):
      rec = records[label]
      thr = np.where(np.isfinite(rec["threshold"][i]), rec["threshold"][i],
                     np.nan)
      family = label.split("(")[0]
      if family not in families:
        families.append(family)
      color = FIG_COLORS[families.index(family) % len(FIG_COLORS)]
      published = "follow=False" in label
      ax.plot(t, thr, color=color, lw=0.9 if published else 1.1,
              ls="--" if published else "-", label=label)
      hit = np.nonzero(rec["acted"][i])[0]
      y = low * 0.8 ** j
      ax.plot(hit, np.full(hit.size, y), "|", color=color, ms=5, mew=0.8,
              alpha=0.55 if published else 1.0)
    ax.set(yscale="log", xlabel="step", title=f"{scenario}, noise"
           f" {100 * noise:g}%", ylim=(low * 0.8 ** (len(labels) + 1),
                                      float(np.max(n)) * 1.5))
    ax.annotate("ticks: steps clipped, one row per method in legend order",
                (0.01, 0.01),
                xycoords="axes fraction", fontsize=7, color="0.3")
  for ax in list(axes.flat)[len(scenarios):]:
    ax.axis("off")
  handles, names = axes.flat[0].get_legend_handles_labels()
  fig.legend(handles, names, loc="lower center", ncol=min(4, len(names)),
             fontsize=8)
  fig.suptitle("Threshold against the gradient norm after a lasting change"
               f" at step {g.change} (spikes x{SPIKE_FACTOR:g} at steps"
               f" {', '.join(map(str, g.spikes))})", fontsize=10)
  fig.tight_layout(rect=(0, 0.06 + 0.02 * (len(names) // 4), 1, 0.97))
  fig.savefig(path, dpi=90)
  plt.close(fig)


# ---------------------------------------------------------------------------
# The real case: the transformer of the stability benchmark.

REAL_LR = 0.3  # The norm falls to about 0.4 by step 20, then rises 2-3x.
REAL_STEPS = 300
REAL_SEEDS = 2


def real_methods() -> dict[str, Callable[[optax.GradientTransformation],
                                          optax.GradientTransformation]]:
  """The real case's methods: label -> the task's optimizer wrapped."""
  def before(clip):
    return lambda opt: optax.chain(clip(), opt)

  return {
      "no clipping": lambda opt: opt,
      "clip_by_global_norm(1.0)": before(lambda: oc.clip_by_global_norm(1.0)),
      "zclip()": before(oc.zclip),
      "zclip(ZScore(follow=False))": before(
          lambda: oc.zclip(oc.ZScore(follow=False))),
      "adagc()": before(oc.adagc),
      "adagc(follow=False)": before(lambda: oc.adagc(follow=False)),
      "clip_by_quantile()": before(oc.clip_by_quantile),
      "skip_step(rule=SpikeEMA())": lambda opt: oc.skip_step(
          opt, rule=oc.SpikeEMA()),
      "skip_step(rule=SpikeWindow(watch='norm'))": lambda opt: oc.skip_step(
          opt, rule=oc.SpikeWindow(watch="norm")),
  }


def real_case(*, lr: float = REAL_LR, steps: int = REAL_STEPS,
              seeds: int = REAL_SEEDS, only: Sequence[str] | None = None,
              log: Callable[[str], None] = lambda s: None
              ) -> dict[str, Any]:
  """Trains the transformer with each method, every seed in one program;
  the share of steps clipped or skipped after the learning-rate warm-up
  (for ``adagc``, steps where any tensor was clipped, and the mean share of
  tensors clipped), the final held-out loss and the mean norm trace."""
  from benchmarks import _stability_tasks as tasks_mod
  from benchmarks import stability

  task = tasks_mod.transformer()
  warm = max(steps // 10, 1)
  seed = jnp.arange(seeds)
  params0 = stability.initial_params(task, seed)
  out: dict[str, Any] = {"lr": lr, "steps": steps, "seeds": seeds,
                         "warmup": warm, "title": task.title, "methods": {}}
  for label, wrap in real_methods().items():
    if only is not None and label not in only and label != "no clipping":
      continue
    log(f"real case: {label}")
    start = time.perf_counter()
    rec = jax.device_get(_train(task, wrap(task.optimizer()), lr, steps)(
        seed, params0, task.data))
    wall = time.perf_counter() - start
    acted = np.asarray(rec["acted"], bool)  # (seeds, steps)
    out["methods"][label] = {
        "share_after_warmup": float(np.mean(acted[:, warm:])),
        "tensors_after_warmup": float(np.mean(rec["frac"][:, warm:])),
        "final_loss": float(np.mean(rec["final"])),
        "final_loss_per_seed": np.asarray(rec["final"]).tolist(),
        "grad_norm": np.asarray(rec["grad_norm"]).mean(axis=0).tolist(),
        "seconds": wall}
  # The unclipped run's norm, 10-step means: its low early in training
  # and the high that follows.
  norm = np.asarray(out["methods"]["no clipping"]["grad_norm"])
  smooth = np.convolve(norm, np.ones(10) / 10, mode="valid")  # Steps i..i+9.
  low = int(np.argmin(smooth[:steps // 5]))
  high = low + int(np.argmax(smooth[low:]))
  out["norm_low"], out["norm_low_step"] = float(smooth[low]), low
  out["norm_high"], out["norm_high_step"] = float(smooth[high]), high
  return out


def _train(task: Any, tx: optax.GradientTransformation, lr: float,
           steps: int) -> Callable:
  grad = jax.value_and_grad(task.loss, has_aux=True)

  def one(seed, params, data):
    key = jax.random.fold_in(jax.random.key(1), seed)
    state = tx.init(params)

    def step(carry, t):
      params, state = carry
      (_, _), grads = grad(params, data, key, t)
      updates, state = tx.update(grads, state, params)
      factor = -lr * task.schedule(t, steps)
      params = jax.tree.map(lambda p, u: p + factor * u, params, updates)
      try:
        rec = _record(state)
        acted, frac = rec["acted"], rec["frac"]
      except ValueError:  # No optaxclip transform: nothing clips.
        acted, frac = jnp.zeros((), bool), jnp.zeros(())
      return (params, state), {"grad_norm": oc.global_norm(grads),
                               "acted": acted, "frac": frac}

    (params, _), trace = jax.lax.scan(step, (params, state),
                                      jnp.arange(steps))
    final, _ = task.evaluate(params, data)
    return {"final": final, **trace}

  return jax.jit(jax.vmap(one, in_axes=(0, 0, None)))


# ---------------------------------------------------------------------------
# The whole benchmark.


def run(*, steps: int = STEPS, change: int = CHANGE, seeds: int = 1,
        noises: Sequence[float] = NOISES, only: Sequence[str] | None = None,
        with_references: bool = True,
        compiler_options: dict[str, Any] | None = None,
        log: Callable[[str], None] = lambda s: None
        ) -> tuple[Grid, dict[str, Any], dict[str, dict[str, np.ndarray]]]:
  """Runs every method and reference on the grid; the summaries (label ->
  record) and each method's per-step arrays."""
  g = grid(noises=noises, seeds=seeds, steps=steps, change=change)
  grads = gradients(g)
  summaries: dict[str, Any] = {}
  records: dict[str, dict[str, np.ndarray]] = {}
  todo: list[tuple[str, Any]] = [(k, m) for k, m in methods().items()]
  if with_references:
    todo += [(k, r) for k, r in references().items()]
  for label, m in todo:
    if only is not None and label not in only:
      continue
    log(label)
    start = time.perf_counter()
    if isinstance(m, Method):
      rec = run_method(m, grads, compiler_options=compiler_options)
      kind = "optaxclip"
    else:
      rec = run_reference(m, g)
      kind = "reference"
    wall = time.perf_counter() - start
    records[label] = rec
    per_run = measure(rec, g, m.design)
    summaries[label] = {"kind": kind, "design": m.design, "main": m.main,
                        "note": getattr(m, "note", ""), "seconds": wall,
                        "noise": summarize(per_run, m.design, noises,
                                           len(g.spikes)),
                        "runs": per_run}
  return g, summaries, records


def markdown(record: dict[str, Any]) -> str:
  meta = record["meta"]
  s = record["settings"]
  parts = ["# Adaptive clipping after a lasting change of the norm level", "",
           f"`{meta['command']}` at commit {meta['commit']}, {meta['date_utc']}"
           f" UTC, {meta['cpu']} ({meta['cpu_count']} cores), jax"
           f" {meta['versions']['jax']}, optax {meta['versions']['optax']};"
           f" {meta['wall_s']:.0f} s.", "",
           f"A {s['dim']}-float gradient, {s['steps']} steps at norm level"
           f" {s['base']:g}, the change at step {s['change']}, spikes x"
           f"{s['spike_factor']:g} at steps"
           f" {', '.join(map(str, s['spikes']))}; {s['seeds']} seed(s) per"
           " noise level. Each cell: the share of the last"
           f" {s['last']} steps clipped or skipped (spikes left out; mean over"
           " seeds), then the steps from the change until a"
           f" {s['window']}-step window holds under the design rate + 5 points"
           " clipped (the slowest seed; *never* if a seed never does)."
           " *steady*: false positives (non-spike steps clipped or skipped,"
           " all steps) and spikes caught. *target*: every change recovered"
           f" within {s['recovery_limit']} steps at a share at most the design"
           " rate + 5 points, and every spike of *steady* caught.", ""]
  for noise in s["noises"]:
    key = f"{noise:g}"
    header = ["method", "design"] + ["steady: false pos., spikes"] + list(
        CHANGES) + ["target"]
    rows = []
    for label, m in record["methods"].items():
      n = m["noise"][key]
      c = n["scenarios"]
      st = c["steady"]
      name = f"`{label}`" if m["kind"] == "optaxclip" else f"ref: {label}"
      rows.append([name, _pct(m["design"]),
                   f"{st['false_positives']}, {st['spikes_caught']}/"
                   f"{st['spikes']}"]
                  + [cell(c[sc]) for sc in CHANGES]
                  + ["yes" if n["meets_target"] else "no"])
    parts += [f"## Noise {100 * noise:g}%", "", table(header, rows), ""]
  caught = []
  for label, m in record["methods"].items():
    total = sum(r["spikes_caught"] for r in m["runs"])
    caught.append([f"`{label}`" if m["kind"] == "optaxclip"
                   else f"ref: {label}",
                   f"{total}/{len(m['runs']) * len(s['spikes'])}"])
  parts += ["Planted spikes caught over every scenario and noise level:", "",
            table(["method", "spikes caught"], caught), ""]
  notes = [f"- `{k}`: {m['note']}" for k, m in record["methods"].items()
           if m.get("note")]
  if notes:
    parts += notes + [""]
  if record.get("figure"):
    parts += [f"![threshold against the norm]({record['figure']})", ""]
  real = record.get("real")
  if real:
    parts += ["## Real case: the transformer of the stability benchmark", "",
              f"{real['title']}; peak learning rate {real['lr']:g},"
              f" {real['steps']} steps, {real['seeds']} seeds (means). Without"
              " clipping the gradient norm (10-step means) falls to"
              f" {real['norm_low']:.3g} at steps {real['norm_low_step']}-"
              f"{real['norm_low_step'] + 9}, then rises to"
              f" {real['norm_high']:.3g} at steps {real['norm_high_step']}-"
              f"{real['norm_high_step'] + 9}. *clipped or skipped*: the share"
              " of the steps after the learning-rate warm-up"
              f" ({real['warmup']} steps) where the clipper scaled something"
              " down or the step was skipped; *tensors*: the mean share of"
              " the tensors scaled down at those steps (per-tensor"
              " clippers); *held-out loss*: at the end, mean over the seeds.",
              ""]
    if real.get("measured"):
      m = real["measured"]
      parts += [f"Measured by `{m['command']}` at commit {m['commit']},"
                f" {m['date_utc']} UTC.", ""]
    rows = [[f"`{k}`", _pct(v["share_after_warmup"]),
             _pct(v["tensors_after_warmup"]) if k.startswith("adagc")
             else "", f"{v['final_loss']:.4f}",
             " to ".join(f"{x:.4f}" for x in sorted(
                 v["final_loss_per_seed"]))]
            for k, v in real["methods"].items()]
    parts += [table(["method", "clipped or skipped", "tensors",
                     "held-out loss", "per seed"], rows), ""]
  return "\n".join(parts)


def parse(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m benchmarks.adaptivity",
                              description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true",
                 help="smoke test: 300 steps, change at step 60, 1 seed,"
                 " no real case")
  p.add_argument("--seeds", type=int, help="seeds per noise level"
                 " (default 3; 1 with --quick)")
  p.add_argument("--steps", type=int)
  p.add_argument("--change", type=int)
  p.add_argument("--noises", help="comma-separated, e.g. 0.01,0.05,0.1")
  p.add_argument("--only", action="append",
                 help="a label of a method or reference to run (repeat for"
                 " several; default all)")
  p.add_argument("--no-references", action="store_true")
  p.add_argument("--no-real", action="store_true", help="skip the real case")
  p.add_argument("--keep-real", action="store_true",
                 help="with --no-real: keep the real case of the results"
                 " already at --out/--name (with the run that measured it)")
  p.add_argument("--real-lr", type=float, default=REAL_LR)
  p.add_argument("--real-steps", type=int, default=REAL_STEPS)
  p.add_argument("--real-seeds", type=int, default=REAL_SEEDS)
  p.add_argument("--figure-noise", type=float, default=0.05)
  p.add_argument("--no-plot", action="store_true")
  p.add_argument("--quiet", action="store_true")
  p.add_argument("--out", default=RESULTS, help="output folder")
  p.add_argument("--name", help="file stem (default adaptivity-<platform>,"
                 " -quick added in quick mode)")
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[str]:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse(argv)
  wall = time.perf_counter()
  steps = args.steps or (300 if args.quick else STEPS)
  change = args.change or (60 if args.quick else CHANGE)
  seeds = args.seeds or (1 if args.quick else 3)
  noises = (tuple(float(x) for x in args.noises.split(","))
            if args.noises else NOISES)
  only = args.only or None

  def log(s):
    if not args.quiet:
      print(f"[{time.perf_counter() - wall:6.1f} s] {s}", file=sys.stderr,
            flush=True)

  g, summaries, records = run(steps=steps, change=change, seeds=seeds,
                              noises=noises, only=only,
                              with_references=not args.no_references,
                              compiler_options=QUICK_COMPILER_OPTIONS
                              if args.quick else None, log=log)
  record: dict[str, Any] = {
      "settings": {"steps": steps, "change": change, "seeds": seeds,
                   "noises": list(noises), "base": BASE, "dim": DIM,
                   "spikes": list(g.spikes), "spike_factor": SPIKE_FACTOR,
                   "last": g.last, "window": WINDOW, "margin": MARGIN,
                   "recovery_limit": RECOVERY_LIMIT,
                   "spike_pass": SPIKE_PASS, "spike_context": SPIKE_CONTEXT},
      "methods": summaries}
  stem = args.name or (f"adaptivity-{jax.default_backend()}"
                       + ("-quick" if args.quick else ""))
  os.makedirs(args.out, exist_ok=True)
  base = os.path.join(args.out, stem)
  if not (args.quick or args.no_real):
    record["real"] = real_case(lr=args.real_lr, steps=args.real_steps,
                               seeds=args.real_seeds, log=log)
  elif args.keep_real:
    with open(base + ".json") as f:
      old = json.load(f)
    record["real"] = old["real"]
    record["real"].setdefault("measured", {
        k: old["meta"].get(k) for k in ("command", "commit", "date_utc")})
  paths = [base + ".json", base + ".md"]
  if not args.no_plot:
    noise = args.figure_noise if args.figure_noise in noises else noises[0]
    labels = [k for k, v in summaries.items() if v["main"]]
    figure(base + ".png", g, records, labels, noise)
    record["figure"] = os.path.basename(base + ".png")
    paths.append(base + ".png")
    if not args.quick and os.path.abspath(args.out) == RESULTS:
      shutil.copy(base + ".png", os.path.join(FIGURES, "adaptivity.png"))
  from benchmarks import run as run_mod
  record["meta"] = {
      "command": " ".join(["python -m benchmarks.adaptivity", *argv]),
      "commit": stability.git_commit(),
      "date_utc": datetime.datetime.now(datetime.UTC).strftime(
          "%Y-%m-%d %H:%M:%S"),
      "platform": jax.default_backend(), "cpu": run_mod._cpu_model(),
      "cpu_count": os.cpu_count(), "wall_s": time.perf_counter() - wall,
      "versions": {"python": platform.python_version(),
                   "jax": jax.__version__, "optax": optax.__version__,
                   "optaxclip": oc.__version__}}
  md = markdown(record)
  if not args.quiet:
    print(md)
  with open(base + ".json", "w") as f:
    json.dump(stability.finite_only(record), f, indent=1)
    f.write("\n")
  with open(base + ".md", "w") as f:
    f.write(md + "\n")
  if not args.quiet:
    print("\nWrote " + ", ".join(paths), file=sys.stderr)
  return paths


if __name__ == "__main__":
  main()
