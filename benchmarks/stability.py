"""``python -m benchmarks.stability [--quick]``: learning-rate sensitivity.

Which clipper, measured: every clipper of optaxclip, chained in front of each
task's optimizer, and the guards on the loss and the update (``skip_step``
with ``SpikeWindow``, ``clip_update_by_history`` after the optimizer, and on
the transformer ``clip_update_rms`` around AdamW and ``qk_clip`` after the
learning-rate step), trained over a log grid of learning rates and several
seeds, on three small tasks (``benchmarks/_stability_tasks.py``): a
character-level transformer (AdamW, no QK-layernorm), the regression MLP with
unscaled targets of ``examples/exploding_gradients.py`` and the LSTM through
time of ``examples/rnn_through_time.py`` (both SGD with momentum).

For each task and method it reports, from the final validation loss of each
run:

- *LR sensitivity* (Wortsman et al. 2024): over the grid, the mean of
  ``min(loss(lr), initial loss) - min over the grid of loss``, with
  ``loss(lr)`` the mean over seeds of each run's ``min(final, initial)``
  (a non-finite final loss counts as the initial loss). 0: the same loss at
  every learning rate; large: only a narrow range trains;
- *best loss* and the learning rate that reached it;
- *sensitivity per seed*: the same from each seed's runs alone (min-max
  over the seeds), for the noise of the measure;
- *log10 sensitivity*: the mean of ``log10(loss(lr) / best)``, the same
  measure on a log scale, for the MSE losses that span orders of magnitude
  (in decades: 1 means the runs of the grid end, on geometric average,
  ten times above the best);
- *largest good LR*: the largest learning rate whose mean loss is within the
  task's margin of the best loss any method reached on the task (+0.05 nats
  for the transformer, 2x the best MSE for the two regressions, whose losses
  span orders of magnitude);
- *diverged*: runs whose final loss is non-finite or not below the initial;
- *loss spikes*: steps whose training loss exceeds 1.25 times the mean of
  the 20 steps before it (the definition of ``examples/loss_spikes.py``),
  counted up to a run's first non-finite loss, per run (mean over the grid).
  On the two SGD tasks, whose batch losses are noisy relative to their
  level, most counted steps are batch noise (about 15% of the regression
  MLP's steps at learning rate 1e-5, where nothing is unstable), so compare
  the counts there only between methods;
- *clipped* / *skipped*: the fraction of steps the clipper scaled something
  down / ``skip_step`` dropped (``oc.clip_stats``'s ``num_clipped`` and
  ``num_skipped``), over all runs;
- for the transformer, the largest attention logit ``q . k / sqrt(d)`` on
  the held-out windows at the end, at the largest learning rate and at the
  best one.

Every (task, method) pair is one jitted program: ``jax.vmap`` over (learning
rate, seed) of a ``lax.scan``-ned training loop; the task's optimizer runs
with learning rate 1 and the loop scales its update by ``-lr * schedule``,
with ``lr`` traced. ``clip_by_global_norm(tuned)`` uses the median pre-clip
gradient norm of the unclipped runs at their best learning rate (the guide's
advice: a threshold near the norm of healthy steps), so it runs after
``no clipping``.

Writes ``benchmarks/results/stability-<platform>.{json,md}``, one figure per
task (``stability-<platform>-<task>.png``, copied to ``docs/figures/`` by the
default run) and prints the tables. ``--quick`` (tiny models and grids, one
seed) writes ``stability-<platform>-quick.*`` instead.

Run from the repository root::

  python -m benchmarks.stability            # 7 learning rates x 2 seeds
  python -m benchmarks.stability --quick    # smoke test, 42 compilations:
                                            # 3 to 4 minutes on 2 shared cores
  python -m benchmarks.stability --seeds 5 --steps 1000 \\
      --lrs transformer=1e-4,1e-3,1e-2,1e-1,1 --tasks transformer
  # Some rows only (and `no clipping`), merged into the results already
  # written by a run on the same grids, steps and seeds:
  python -m benchmarks.stability --methods "qk_clip(),clip_update_rms()" --merge

References:
  Wortsman et al., `Small-scale proxies for large-scale Transformer training
  instabilities <https://arxiv.org/abs/2309.14322>`_, ICLR 2024.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaxclip as oc
from benchmarks import _stability_tasks as tasks_mod

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
FIGURES = os.path.join(ROOT, "docs", "figures")
SPIKE_RATIO, SPIKE_WINDOW = 1.25, 20  # As examples/loss_spikes.py.
SKIP_FACTOR = 5.0  # skip_step's SpikeEMA max_ratio, as examples/loss_spikes.py.
# --quick checks the harness rather than measuring: it compiles without XLA's
# backend optimizations, in about half the time.
QUICK_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
QK_MAX_LOGIT = 100.0  # qk_clip's default max_logit, Kimi K2's tau.
# --quick leaves out, on the transformer (its compilations are the longest),
# the guards that do not depend on the optimizer: the SGD tasks run them.
QUICK_SKIP = {"transformer": ("skip_step(SpikeWindow())",
                              "clip_update_by_history()",
                              "z-loss(0.0001) (model)",
                              "clip_by_spectral_norm(1.0)",
                              "QK-layernorm + z-loss(0.0001) (model)")}

class AfterLR(NamedTuple):
  """A method whose last link acts on the step the learning rate scaled.

  ``oc.qk_clip`` must be the last link of the chain: it returns
  ``s * (W + u) - W`` for the query and key leaves, with ``u`` the step
  that will be added to the parameters ``W``. The training loop scales the
  optimizer's output by ``-lr * schedule``, so it runs ``inner`` (learning
  rate 1), scales its output, then ``last`` on that step, with the
  parameters and the batch's per-head max logits, and adds the result.
  """

  inner: optax.GradientTransformation
  last: optax.GradientTransformationExtraArgs


class ModelVariant(NamedTuple):
  """A reference row that changes the model or the loss, not the optimizer.

  ``options`` are keyword arguments of the task's constructor (the
  transformer's ``qk_norm`` and ``z_loss``); ``inner`` is the method the
  variant trains with (the task's plain optimizer for the reference rows).
  """

  options: dict[str, Any]
  inner: optax.GradientTransformation


Method = optax.GradientTransformation | AfterLR | ModelVariant
Z_LOSS = 1e-4  # PaLM's and Wortsman et al.'s z-loss coefficient.


def history_window(steps: int) -> int:
  """The window of the rolling rules: their default 128, at most steps / 2."""
  return min(128, max(steps // 2, 2))


def methods(task: tasks_mod.Task, steps: int, tuned: float | None
            ) -> dict[str, Method]:
  """Every method on ``task``: label -> optimizer (learning rate 1).

  ``tuned`` is the tuned global-norm threshold; None leaves that row out
  (it is measured from the ``no clipping`` row). The update-clipping rows
  that read Adam's second moment (``clip_update_rms``) or attention logits
  (``qk_clip``) run on the transformer alone.
  """
  opt = task.optimizer
  adam = task.name == "transformer"
  value = task.settings["clip_by_value"]
  agc = task.settings["adaptive_grad_clip"]
  zclip_warmup = min(25, max(steps // 8, 1))
  adagc_warmup = min(100, max(steps // 4, 1))
  window = history_window(steps)

  def chain(clipper):
    return optax.chain(clipper, opt())

  rows = {
      "no clipping": opt(),
      "clip_by_global_norm(1.0)": chain(oc.clip_by_global_norm(1.0)),
      "clip_by_global_norm(tuned)": None if tuned is None else chain(
          oc.clip_by_global_norm(tuned)),
      "clip_by_norm(1.0)": chain(oc.clip_by_norm(1.0)),
      f"clip_by_value({value:g})": chain(
          oc.clip_by_value(value, full_stats=True)),
      f"adaptive_grad_clip({agc:g})": chain(oc.adaptive_grad_clip(agc)),
      "clip_by_quantile(0.9)": chain(oc.clip_by_quantile(0.9)),
      "clip_by_quantile(0.9, per_leaf)": chain(
          oc.clip_by_quantile(0.9, per_leaf=True)),
      "zclip()": chain(oc.zclip(oc.ZScore(warmup_steps=zclip_warmup))),
      "adagc()": chain(oc.adagc(warmup_steps=adagc_warmup)),
      # SPAM's rule reads Adam's own second moment (spike_clipped wraps
      # AdamW); before SGD, clip_spikes keeps its own. One row, as before 0.4.
      "clip_spikes()": (oc.spike_clipped(opt()) if adam
                        else chain(oc.clip_spikes(decay=0.999))),
      "skip_step(zclip())": oc.skip_step(
          chain(oc.zclip(oc.ZScore(warmup_steps=zclip_warmup))),
          rule=oc.SpikeEMA(max_ratio=SKIP_FACTOR)),
      # The guards on the loss and on the update.
      "skip_step(SpikeWindow())": oc.skip_step(
          opt(), rule=oc.SpikeWindow(window=window)),
      # eps 1e-6 (StableAdamW's) in the RMS, as before 0.4; AdamW keeps 1e-8.
      "clip_update_rms()": oc.clip_update_rms(
          opt(), decay=task.settings["adam_b2"], eps=1e-6) if adam else None,
      "clip_update_by_history()": optax.chain(
          opt(), oc.clip_update_by_history(window=window)),
      "qk_clip()": AfterLR(opt(), oc.qk_clip(
          QK_MAX_LOGIT, layout=oc.QKLayout(query_path="q", key_path="k")))
      if adam else None,
      # The singular values of each 2-D weight's gradient capped at 1 (the
      # attention kernels, (dim, heads, head_dim), are left out: their
      # last two axes are not the projection's matrix).
      "clip_by_spectral_norm(1.0)": chain(oc.clip_by_spectral_norm(
          1.0, mask=lambda g: jax.tree.map(lambda x: x.ndim == 2, g)))
      if adam else None,
      # Reference rows that are not clippers (Wortsman et al. 2024): they
      # show what a known fix does to this task's sensitivity.
      "QK-layernorm (model)": ModelVariant({"qk_norm": True}, opt())
      if adam else None,
      f"z-loss({Z_LOSS:g}) (model)": ModelVariant({"z_loss": Z_LOSS}, opt())
      if adam else None,
      f"QK-layernorm + z-loss({Z_LOSS:g}) (model)": ModelVariant(
          {"qk_norm": True, "z_loss": Z_LOSS}, opt()) if adam else None,
  }
  return {k: v for k, v in rows.items() if v is not None}


def method_notes(task: tasks_mod.Task, steps: int) -> list[str]:
  zclip_warmup = min(25, max(steps // 8, 1))
  adagc_warmup = min(100, max(steps // 4, 1))
  spikes = ("`clip_spikes()`: `oc.spike_clipped(adamw)` wraps AdamW and"
            " reads its `nu`"
            if task.name == "transformer" else
            "`clip_spikes()`: `oc.clip_spikes(decay=0.999)` (standalone)"
            " before SGD")
  window = history_window(steps)
  notes = [f"`zclip()`: `zclip(ZScore(warmup_steps={zclip_warmup}))`, "
           f"`adagc(warmup_steps={adagc_warmup})`, other arguments their"
           " defaults",
           f"{spikes}",
           "`skip_step(zclip())`: `skip_step(chain(zclip(), opt),"
           f" rule=SpikeEMA(max_ratio={SKIP_FACTOR:g}))` (non-finite steps"
           " skipped too)",
           "`skip_step(SpikeWindow())`: `skip_step(opt,"
           f" rule=SpikeWindow(window={window}))`"
           " (levanter's rule: loss or gradient norm more than 6 standard"
           " deviations above the mean of the window, judged from"
           f" {max(2, window // 2)} values; `update(..., loss=loss)` gets"
           " the batch loss; no clipper)",
           f"`chain(opt, clip_update_by_history(window={window}))`: the"
           " optimizer's output clipped to mean + 3 std of its recent"
           " norms, before the learning rate and its schedule scale it"]
  if task.name == "transformer":
    notes += ["`clip_update_rms()`: `clip_update_rms(adamw,"
              f" decay={task.settings['adam_b2']:g}, eps=1e-6)` (StableAdamW's"
              " per-tensor rule, eps 1e-6 in the RMS; AdamW's own eps stays"
              " 1e-8 as in the other rows)",
              f"`qk_clip()`: `qk_clip({QK_MAX_LOGIT:g})` (MuonClip's QK-Clip,"
              " query_exponent 0.5) after"
              " AdamW on the learning-rate-scaled step: the loop adds"
              " `-lr * schedule * adamw(g)` and then rescales each head's"
              " query and key by the head's largest logit on the step's"
              " batch",
              "`clip_by_spectral_norm(1.0)`: `chain(clip_by_spectral_norm("
              "1.0, mask=<2-D leaves>), adamw)`: each 2-D weight's gradient"
              " (embedding, MLP, output head) with its singular values"
              " capped at 1 (the attention kernels, 3-D, left out)",
              "`QK-layernorm (model)`, `z-loss(...) (model)`: reference rows"
              " that change the model, not the optimizer (Wortsman et al."
              " 2024): a LayerNorm on each head's queries and keys before"
              f" their product; `{Z_LOSS:g} * logsumexp(logits)^2` added to"
              " the training loss (the held-out loss stays the plain"
              " cross-entropy); AdamW alone"]
  return notes


# ---------------------------------------------------------------------------
# Training: one program per (task, method), vmapped over (lr, seed).


def make_train(task: tasks_mod.Task, method: Method,
               steps: int) -> Callable:
  """``(lrs, seeds, data) -> record``: every run of the grid at once.

  Every method gets the batch loss as ``update(..., loss=loss)`` (read by
  ``skip_step``'s ``SpikeWindow`` rule, ignored by the others); an
  :class:`AfterLR` method's last link gets the learning-rate-scaled step and
  the batch's per-head max logits.
  """
  after = method if isinstance(method, AfterLR) else None
  tx = optax.with_extra_args_support(
      after.inner if after is not None else method)

  def one(lr, seed, params, data):
    data_key = jax.random.fold_in(jax.random.key(1), seed)
    state = tx.init(params)
    if after is not None:
      state = (state, after.last.init(params))
    initial, _ = task.evaluate(params, data)
    grad = jax.value_and_grad(task.loss, has_aux=True)

    def step(carry, t):
      params, state = carry
      (loss, aux), grads = grad(params, data, data_key, t)
      max_logits = aux.pop(tasks_mod.MAX_LOGITS, None)
      factor = -lr * task.schedule(t, steps)
      if after is None:
        updates, state = tx.update(grads, state, params, loss=loss)
        params = jax.tree.map(lambda p, u: p + factor * u, params, updates)
      else:
        updates, inner = tx.update(grads, state[0], params, loss=loss)
        updates = jax.tree.map(lambda u: factor * u, updates)
        updates, last = after.last.update(updates, state[1], params,
                                          max_logits=max_logits)
        state = (inner, last)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
      return (params, state), {"loss": loss, "grad_norm": oc.global_norm(grads),
                               **aux}

    (params, state), trace = jax.lax.scan(step, (params, state),
                                          jnp.arange(steps))
    final, aux = task.evaluate(params, data)
    aux.pop(tasks_mod.MAX_LOGITS, None)
    counts = {k: v for k, v in _stats(state).items()
              if k.endswith(("/num_clipped", "/num_skipped"))}
    return {"initial": initial, "final": final, "counts": counts,
            "trace": trace, **{f"final_{k}": v for k, v in aux.items()}}

  return jax.vmap(one, in_axes=(0, 0, 0, None))


def initial_params(task: tasks_mod.Task, seed: jax.Array) -> Any:
  """Each run's initial parameters, drawn op by op, outside the training
  program.

  Inside it, the LSTM's four orthogonal initializations (QR factorizations
  batched over the runs) may run side by side, and on a 2-core CPU each of
  jaxlib's batched QR kernels can then wait for work queued behind the
  other on the 2-thread pool: the program hangs. Drawn here, one
  operation at a time, the values are the same.
  """
  keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(0), s))(seed)
  return jax.block_until_ready(jax.vmap(task.init)(keys))


def _stats(state: Any) -> dict[str, jax.Array]:
  try:
    return oc.clip_stats(state, scalars=True)
  except ValueError:  # No optaxclip transform in the chain.
    return {}


def train(task: tasks_mod.Task, tx: Method,
          lrs: list[float], seeds: int, steps: int, quick: bool
          ) -> dict[str, Any]:
  """Trains every (lr, seed) pair; compile and run seconds; host arrays."""
  lr = jnp.repeat(jnp.asarray(lrs, jnp.float32), seeds)
  seed = jnp.tile(jnp.arange(seeds), len(lrs))
  params = initial_params(task, seed)
  start = time.perf_counter()
  lowered = jax.jit(make_train(task, tx, steps)).lower(lr, seed, params,
                                                       task.data)
  compiled = lowered.compile(QUICK_COMPILER_OPTIONS if quick else None)
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  out = jax.device_get(jax.block_until_ready(compiled(lr, seed, params,
                                                      task.data)))
  run_s = time.perf_counter() - start
  shape = (len(lrs), seeds)
  return {"compile_s": compile_s, "run_s": run_s,
          **jax.tree.map(lambda x: np.asarray(x).reshape(shape + x.shape[1:]),
                         out)}


# ---------------------------------------------------------------------------
# Measures.


def loss_spikes(loss: np.ndarray) -> int:
  """Steps whose loss exceeds SPIKE_RATIO x the mean of the SPIKE_WINDOW before.

  Counted up to the first non-finite loss.
  """
  bad = ~np.isfinite(loss)
  if bad.any():
    loss = loss[:int(np.argmax(bad))]
  w = SPIKE_WINDOW
  if len(loss) <= w:
    return 0
  c = np.cumsum(np.r_[0.0, loss.astype(np.float64)])
  mean = (c[w:-1] - c[:-w - 1]) / w  # mean of loss[t-w:t] for t = w..n-1
  return int(np.sum(loss[w:] > SPIKE_RATIO * mean))


def capped(r: dict[str, Any]) -> np.ndarray:
  """Per (lr, seed): ``min(final, initial)``, a non-finite final as initial."""
  final, initial = r["final"], r["initial"]
  return np.where(np.isfinite(final), np.minimum(final, initial), initial)


def summarize(r: dict[str, Any], lrs: list[float]) -> dict[str, Any]:
  """The measures of one (task, method) from its runs."""
  curve = capped(r).mean(axis=1)  # Mean over seeds, per learning rate.
  best = int(np.argmin(curve))
  diverged = ~np.isfinite(r["final"]) | (r["final"] >= r["initial"])
  losses = r["trace"]["loss"]
  spikes = np.array([[loss_spikes(x) for x in row] for row in losses])
  steps = losses.shape[-1]
  counts = {k.split("/")[0] + "/" + k.split("/")[-1]: v
            for k, v in r["counts"].items()}
  clipped = [v for k, v in counts.items() if k.endswith("num_clipped")
             and not k.startswith("skip_step")]
  skipped = [v for k, v in counts.items() if k.endswith("num_skipped")]
  out = {
      "loss": [float(x) for x in curve],
      "final": r["final"].tolist(),
      "initial": float(np.mean(r["initial"])),
      "sensitivity": float(np.mean(curve - curve[best])),
      "sensitivity_per_seed": [float(np.mean(c - c.min()))
                               for c in capped(r).T],
      "log10_sensitivity": float(np.mean(np.log10(curve / curve[best]))),
      "best_loss": float(curve[best]), "best_lr": lrs[best],
      "diverged": diverged.sum(axis=1).tolist(),
      "num_diverged": int(diverged.sum()),
      "loss_spikes": spikes.tolist(),
      # Per (lr, seed): the first step whose training loss is not finite.
      "first_nonfinite_step": [
          [int(np.argmax(~np.isfinite(x))) if not np.isfinite(x).all()
           else None for x in row] for row in losses],
      "loss_spikes_per_run": float(spikes.mean()),
      "frac_clipped": (float(np.sum(clipped[0]) / (steps * clipped[0].size))
                       if clipped else None),
      "frac_clipped_per_lr": (
          (clipped[0].mean(axis=1) / steps).tolist() if clipped else None),
      "frac_skipped": (float(np.sum(skipped[0]) / (steps * skipped[0].size))
                       if skipped else None),
      "frac_skipped_per_lr": (
          (skipped[0].mean(axis=1) / steps).tolist() if skipped else None),
      "max_grad_norm": float(np.nanmax(np.where(
          np.isfinite(r["trace"]["grad_norm"]), r["trace"]["grad_norm"],
          np.nan))) if np.isfinite(r["trace"]["grad_norm"]).any() else None,
      "compile_s": r["compile_s"], "run_s": r["run_s"],
  }
  if "final_attn_logit_max" in r:
    top = r["final_attn_logit_max"]
    out["attn_logit_max"] = [_finite(x) for x in top.mean(axis=1)]
    out["attn_logit_max_at_best_lr"] = _finite(top[best].mean())
    out["attn_logit_max_at_top_lr"] = _finite(top[-1].mean())
  return out


def compare_to_reference(summaries: dict[str, dict[str, Any]]) -> None:
  """Adds each row's difference of LR sensitivity from ``no clipping``.

  ``vs_no_clipping``: the mean over seeds of the paired difference (each
  seed's sensitivity minus ``no clipping``'s with the same seed: the same
  initial parameters and batches); ``vs_no_clipping_per_seed``: those
  differences; ``outside_spread``: whether the row's per-seed range and
  ``no clipping``'s do not overlap, the test that a difference exceeds the
  seeds' spread.
  """
  ref = summaries.get("no clipping", {}).get("sensitivity_per_seed")
  if ref is None:
    return
  ref = np.asarray(ref)
  for s in summaries.values():
    if s.get("sensitivity_per_seed") is None:
      continue
    mine = np.asarray(s["sensitivity_per_seed"])
    d = mine - ref
    s["vs_no_clipping"] = float(d.mean())
    s["vs_no_clipping_per_seed"] = d.tolist()
    s["outside_spread"] = bool(mine.max() < ref.min()
                               or mine.min() > ref.max())


def _finite(x) -> float | None:
  x = float(x)
  return x if math.isfinite(x) else None


def healthy_norm(r: dict[str, Any], lrs: list[float]) -> float:
  """The median pre-clip norm of the runs at their best learning rate."""
  best = int(np.argmin(capped(r).mean(axis=1)))
  norms = r["trace"]["grad_norm"][best]
  median = float(np.median(norms[np.isfinite(norms)]))
  return float(f"{median:.2g}")


def largest_good_lr(summary: dict[str, Any], lrs: list[float],
                    task_best: float, margin: tuple[str, float]
                    ) -> float | None:
  """The largest learning rate whose loss is within ``margin`` of the best."""
  kind, value = margin
  limit = task_best + value if kind == "+" else task_best * value
  good = [lr for lr, loss in zip(lrs, summary["loss"]) if loss <= limit]
  return max(good) if good else None


def margin_text(margin: tuple[str, float]) -> str:
  kind, value = margin
  return f"+{value:g} over" if kind == "+" else f"{value:g}x"


# ---------------------------------------------------------------------------
# Report: Markdown, JSON, figures.


def fmt(x: Any, digits: int = 4) -> str:
  if x is None:
    return "–"
  if isinstance(x, str):
    return x
  x = float(x)
  if math.isnan(x):
    return "nan"
  if math.isinf(x):
    return "inf"
  return f"{x:.{digits}g}"


def table(header: list[str], rows: list[list[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |",
           "| " + " | ".join("---" for _ in header) + " |"]
  lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def markdown(record: dict[str, Any]) -> str:
  meta = record["meta"]
  parts = [f"# Learning-rate sensitivity of every clipper ({meta['platform']})",
           ""]
  for run in meta.get("runs") or [meta]:
    commit = f" at commit {run['commit']}" if run.get("commit") else ""
    rows = run.get("rows")
    parts += [f"`{run['command']}` on {run['date_utc']} UTC{commit};"
              f" {meta['cpu']} ({meta['cpu_count']} CPUs); jax"
              f" {meta['versions']['jax']}, optax"
              f" {meta['versions']['optax']}; {meta['seeds']} seed(s); wall"
              f" time {run['wall_s']:.0f} s, compilation included"
              + (f"; the rows {', '.join(f'`{r}`' for r in rows)}"
                 if rows else "") + ".", ""]
    if run.get("note"):
      parts += [run["note"], ""]
  if meta["quick"]:
    parts += ["**Quick mode**: tiny models, few steps, one seed: a smoke test"
              " of the harness, not a measurement.", ""]
  parts += [
      "*LR sensitivity*: mean over the grid of `min(loss(lr), initial) -"
      " best` (Wortsman et al. 2024), `loss(lr)` the mean over seeds of each"
      " run's final validation loss, a non-finite one counted as the initial"
      " loss; *per seed*: the same from each seed's runs (min-max);"
      " *vs no clipping*: the mean over seeds of the row's sensitivity"
      " minus `no clipping`'s with the same seed (same initial parameters"
      " and batches), and the range of those paired differences;"
      " *outside seeds' spread*: whether the row's per-seed range and"
      " `no clipping`'s do not overlap."
      " *log10*: the mean over the grid of `log10(min(loss(lr), initial) /"
      " best)`, in decades."
      " *largest good LR*: the largest learning rate whose loss is"
      " within the task's margin of the task's best (over every method)."
      " *diverged*: runs whose final loss is non-finite or not below the"
      " initial one. *loss spikes*: steps whose training loss exceeds"
      f" {SPIKE_RATIO} x the mean of the {SPIKE_WINDOW} before (up to the"
      " first non-finite one), per run, mean over the grid. *clipped* /"
      " *skipped*:"
      " fraction of all steps of all runs.", ""]
  for name, t in record["tasks"].items():
    lrs = t["lrs"]
    parts += [f"## {name}: {t['title']}", "",
              f"{t['steps']} steps; learning rates {', '.join(map(fmt, lrs))};"
              f" {t['loss_name']}, initial {fmt(t['initial'])}; task best"
              f" {fmt(t['best_loss'])}; good: at most"
              f" {margin_text(t['margin'])} the task best. {t['note']}"
              f" `clip_by_global_norm(tuned)`: threshold {fmt(t['tuned'])}, the"
              " median pre-clip gradient norm of the unclipped runs at their"
              f" best learning rate ({fmt(t['tuned_from_lr'])}). "
              + "; ".join(t["method_notes"]) + ".", ""]
    header = ["method", "LR sensitivity", "per seed", "vs no clipping",
              "outside seeds' spread", "log10", "best loss", "best LR",
              "largest good LR", "diverged", "loss spikes", "clipped",
              "skipped"]
    if name == "transformer":
      header += ["attn logit max (best LR)", "attn logit max (top LR)"]
    header += ["compile s", "run s"]
    rows = []
    for label, m in t["methods"].items():
      per_seed = m["sensitivity_per_seed"]
      diff = m.get("vs_no_clipping_per_seed")
      row = [f"`{label}`", m["sensitivity"],
             f"{fmt(min(per_seed))}-{fmt(max(per_seed))}",
             (f"{m['vs_no_clipping']:+.3f} ({min(diff):+.3f} to"
              f" {max(diff):+.3f})" if diff and label != "no clipping"
              else None),
             (("yes" if m["outside_spread"] else "no")
              if diff and label != "no clipping" else None),
             m["log10_sensitivity"], m["best_loss"],
             m["best_lr"],
             m["largest_good_lr"],
             f"{m['num_diverged']}/{len(lrs) * meta['seeds']}",
             m["loss_spikes_per_run"], m["frac_clipped"],
             m["frac_skipped"]]
      if name == "transformer":
        row += [m["attn_logit_max_at_best_lr"], m["attn_logit_max_at_top_lr"]]
      rows.append(row + [m["compile_s"], m["run_s"]])
    parts += [table(header, rows), ""]
    parts += ["Final loss per learning rate (mean over seeds; divergent runs"
              " counted at the initial loss):", "",
              table(["method"] + [fmt(lr) for lr in lrs],
                    [[f"`{label}`"] + m["loss"]
                     for label, m in t["methods"].items()]), ""]
    if t.get("figure"):
      parts += [f"![{name}: final loss against learning rate]"
                f"({os.path.basename(t['figure'])})", ""]
  return "\n".join(parts)


# Sixteen distinguishable colours and a marker each, in the methods' order.
COLORS = ["black", "C0", "C1", "C2", "C3", "C4", "C5", "C6", "C8", "C9",
          "#e6ab02", "C7", "#1b9e77", "#e7298a", "#66a61e", "#a6761d"]
MARKERS = "os^vD<>ph*XPd8H1"


def figure(path: str, name: str, t: dict[str, Any], seeds: int) -> None:
  """Final loss against learning rate, one curve per method, and sensitivity."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  lrs = np.asarray(t["lrs"])
  fig, (ax, bar) = plt.subplots(1, 2, figsize=(14, 6.4),
                                gridspec_kw={"width_ratios": [1.5, 1]})
  labels = list(t["methods"])
  color = {k: COLORS[i % len(COLORS)] for i, k in enumerate(labels)}
  for i, label in enumerate(labels):
    m = t["methods"][label]
    ax.plot(lrs, m["loss"], color=color[label], ls="-" if i % 2 else "--",
            marker=MARKERS[i % len(MARKERS)], ms=5, lw=1.2, label=label)
    final = np.asarray(m["final"], float)  # (lrs, seeds)
    bad = ~np.isfinite(final) | (final >= np.asarray(t["initial_runs"][label]))
    for j in np.nonzero(bad.any(axis=1))[0]:
      ax.plot(lrs[j], m["loss"][j], "x", color="red", ms=11, mew=1.5,
              zorder=5)
  ax.axhline(t["initial"], color="gray", ls=":", lw=1)
  ax.annotate("initial loss: a divergent run counts here (red x)",
              (lrs[0], t["initial"]), textcoords="offset points",
              xytext=(2, -12), color="gray", fontsize=8)
  ax.set(xscale="log", yscale="log" if t["log_loss"] else "linear",
         xlabel="peak learning rate", ylabel=t["loss_name"],
         title=f"{name}: final loss, mean of {seeds} seed(s)")
  ax.legend(fontsize=8, ncol=3, loc="upper center",
            bbox_to_anchor=(0.5, -0.12))
  order = sorted(labels, key=lambda k: t["methods"][k]["sensitivity"])
  values = [t["methods"][k]["sensitivity"] for k in order]
  bar.barh(range(len(order)), values, color=[color[k] for k in order])
  for i, k in enumerate(order):
    per_seed = t["methods"][k]["sensitivity_per_seed"]
    bar.plot([min(per_seed), max(per_seed)], [i, i], color="gray", lw=1)
    bar.annotate(fmt(values[i], 3), (values[i], i), textcoords="offset points",
                 xytext=(3, -3), fontsize=7)
  bar.set_yticks(range(len(order)), order, fontsize=8)
  bar.invert_yaxis()
  bar.set(xlabel="LR sensitivity (lower is better; gray: range over seeds)",
          title="mean over the grid of min(loss, initial) - best")
  fig.suptitle(t["title"], fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


# ---------------------------------------------------------------------------
# Command line.


def parse(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m benchmarks.stability",
                              description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true",
                 help="smoke test: tiny models and grid, few steps, 1 seed")
  p.add_argument("--tasks", help="comma-separated, from: "
                 + ", ".join(tasks_mod.TASKS))
  p.add_argument("--seeds", type=int, help="seeds per learning rate"
                 " (default 2; 1 with --quick)")
  p.add_argument("--steps", type=int, help="training steps for every task"
                 " (default: each task's own)")
  p.add_argument("--lrs", action="append", default=[],
                 metavar="TASK=LR,LR,...", help="a task's learning-rate grid"
                 " (repeat for several tasks)")
  p.add_argument("--only", "--methods", dest="only",
                 help="comma-separated method labels to run"
                 " (`no clipping` always runs)")
  p.add_argument("--merge", action="store_true",
                 help="merge the rows measured (but `no clipping`) into the"
                 " results already at --out/--name, measured on the same"
                 " grids, steps and seeds; the other rows stay as they were"
                 " measured, with their command, date and commit")
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--no-plot", action="store_true")
  p.add_argument("--out", default=RESULTS, help="output folder")
  p.add_argument("--name", help="file stem (default stability-<platform>,"
                 " -quick added in quick mode)")
  return p.parse_args(argv)


def progress(total: int, quiet: bool):
  """A tqdm bar, or a plain line per step when tqdm is not installed."""
  if quiet:
    return None
  try:
    from tqdm import tqdm
  except ImportError:
    return _Lines(total)
  return tqdm(total=total, file=sys.stderr, unit="run", dynamic_ncols=True)


class _Lines:
  def __init__(self, total: int):
    self.total, self.n, self.text = total, 0, ""

  def set_description(self, text: str) -> None:
    self.text = text

  def update(self, n: int) -> None:
    self.n += n
    print(f"[{self.n}/{self.total}] {self.text}", file=sys.stderr, flush=True)

  def close(self) -> None:
    pass


def main(argv: list[str] | None = None) -> list[str]:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse(argv)
  wall = time.perf_counter()
  names = args.tasks.split(",") if args.tasks else list(tasks_mod.TASKS)
  for n in names:
    if n not in tasks_mod.TASKS:
      raise SystemExit(f"unknown task {n!r}; choose from {list(tasks_mod.TASKS)}")
  grids = {}
  for item in args.lrs:
    n, _, values = item.partition("=")
    grids[n] = [float(v) for v in values.split(",")]
  seeds = args.seeds or (1 if args.quick else 2)
  tasks = [tasks_mod.TASKS[n](quick=args.quick) for n in names]
  plan = {}
  for task in tasks:
    steps = args.steps or (30 if args.quick else task.steps)
    lrs = grids.get(task.name) or (
        [task.lrs[0], task.reference_lr, task.lrs[-1]] if args.quick
        else list(task.lrs))
    labels = list(methods(task, steps, 1.0))
    if args.quick:
      labels = [k for k in labels if k not in QUICK_SKIP.get(task.name, ())]
    if args.only:
      keep = {"no clipping", *args.only.split(",")}
      labels = [k for k in labels if k in keep]
    plan[task.name] = (task, steps, sorted(lrs), labels)
  bar = progress(sum(len(p[3]) for p in plan.values()), args.no_progress)
  record: dict[str, Any] = {"tasks": {}}
  try:
    for name, (task, steps, lrs, labels) in plan.items():
      runs: dict[str, dict] = {}
      tuned = None
      for label in labels:
        if bar is not None:
          bar.set_description(f"{name}: {label}")
        tx = methods(task, steps, tuned if tuned is not None else 1.0)[label]
        run_task = task
        if isinstance(tx, ModelVariant):
          run_task = tasks_mod.TASKS[name](quick=args.quick, **tx.options)
          tx = tx.inner
        runs[label] = train(run_task, tx, lrs, seeds, steps, args.quick)
        if label == "no clipping":
          tuned = healthy_norm(runs[label], lrs)
        if bar is not None:
          bar.update(1)
      record["tasks"][name] = report_task(task, steps, lrs, seeds, runs, tuned)
  finally:
    if bar is not None:
      bar.close()
  record["meta"] = metadata(argv, args, seeds, time.perf_counter() - wall)
  if args.merge:
    record = merge(record, os.path.join(args.out, stem(record, args)
                                        + ".json"))
  return write(record, args)


def stem(record: dict[str, Any], args: argparse.Namespace) -> str:
  return args.name or (f"stability-{record['meta']['platform']}"
                       + ("-quick" if args.quick else ""))


def merge(record: dict[str, Any], path: str) -> dict[str, Any]:
  """The record at ``path`` with ``record``'s rows, but ``no clipping``'s,
  added or replaced.

  Each task must have been measured on the same learning rates, steps and
  seeds. ``no clipping``, which every run measures again, is kept as it
  was; the largest difference of its mean final loss between the two runs
  is recorded (``no_clipping_change``), a check that the rows compare.
  Each row keeps the run it was measured in (``measured``: its index in
  ``meta["runs"]``); the task's best loss and every row's largest good
  learning rate are taken again over all rows.
  """
  with open(path) as f:
    old = json.load(f)
  meta = old["meta"]
  runs = meta.get("runs") or [_run(meta, None)]
  new_run = _run(record["meta"], [])
  for name, t in record["tasks"].items():
    o = old["tasks"].get(name)
    if o is None:
      raise SystemExit(f"--merge: {path} has no task {name!r}.")
    for key in ("lrs", "steps", "seeds"):
      if o[key] != t[key]:
        raise SystemExit(f"--merge: {name}'s {key} is {t[key]} here but"
                         f" {o[key]} in {path}; measure on the same.")
    for m in o["methods"].values():
      m.setdefault("measured", 0)
    a = np.asarray(o["methods"]["no clipping"]["loss"])
    b = np.asarray(t["methods"]["no clipping"]["loss"])
    new_run["no_clipping_change"][name] = float(np.max(np.abs(a - b)))
    for label, m in t["methods"].items():
      if label == "no clipping":
        continue
      o["methods"][label] = {**m, "measured": len(runs)}
      o["initial_runs"][label] = t["initial_runs"][label]
      if label not in new_run["rows"]:
        new_run["rows"].append(label)
    o["method_notes"], o["settings"] = t["method_notes"], t["settings"]
    o["best_loss"] = min(m["best_loss"] for m in o["methods"].values())
    for m in o["methods"].values():
      m["largest_good_lr"] = largest_good_lr(m, o["lrs"], o["best_loss"],
                                             tuple(o["margin"]))
    compare_to_reference(o["methods"])
  meta["runs"] = runs + [new_run]
  meta["date_utc"] = record["meta"]["date_utc"]
  meta["wall_s"] = sum(r["wall_s"] for r in meta["runs"])
  return old


def _run(meta: dict[str, Any], rows: list[str] | None) -> dict[str, Any]:
  """One run's entry of ``meta["runs"]``."""
  out = {k: meta.get(k) for k in ("command", "date_utc", "commit", "wall_s")}
  out.update(rows=rows, note=meta.get("note"))
  if rows is not None:
    out["no_clipping_change"] = {}
  return out


def report_task(task: tasks_mod.Task, steps: int, lrs: list[float],
                seeds: int, runs: dict[str, dict], tuned: float | None
                ) -> dict[str, Any]:
  summaries = {label: summarize(r, lrs) for label, r in runs.items()}
  task_best = min(s["best_loss"] for s in summaries.values())
  for s in summaries.values():
    s["largest_good_lr"] = largest_good_lr(s, lrs, task_best, task.margin)
  compare_to_reference(summaries)
  ref = runs["no clipping"]
  return {"title": task.title, "note": task.note, "loss_name": task.loss_name,
          "steps": steps, "lrs": lrs, "seeds": seeds,
          "reference_lr": task.reference_lr, "settings": task.settings,
          "margin": task.margin,
          "method_notes": method_notes(task, steps),
          "initial": float(np.mean(ref["initial"])),
          "initial_runs": {label: r["initial"].tolist()
                           for label, r in runs.items()},
          "best_loss": task_best, "tuned": tuned,
          "tuned_from_lr": lrs[int(np.argmin(capped(ref).mean(axis=1)))],
          "log_loss": task.log_loss, "methods": summaries}


def metadata(argv: list[str], args: argparse.Namespace, seeds: int,
             wall_s: float) -> dict[str, Any]:
  from benchmarks import run
  return {"command": " ".join(["python -m benchmarks.stability", *argv]),
          "commit": git_commit(),
          "date_utc": datetime.datetime.now(datetime.UTC).strftime(
              "%Y-%m-%d %H:%M:%S"),
          "platform": jax.default_backend(), "cpu": run._cpu_model(),
          "cpu_count": os.cpu_count(), "quick": args.quick, "seeds": seeds,
          "spike_ratio": SPIKE_RATIO,
          "spike_window": SPIKE_WINDOW, "wall_s": wall_s,
          "versions": {"python": platform.python_version(),
                       "jax": jax.__version__, "optax": optax.__version__,
                       "optaxclip": oc.__version__}}


def git_commit() -> str | None:
  """The checkout's short commit, ``+`` appended when files differ from it."""
  import subprocess
  try:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    dirty = subprocess.run(["git", "status", "--porcelain",
                            "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True, check=True)
  except (OSError, subprocess.CalledProcessError):
    return None
  return head.stdout.strip() + ("+" if dirty.stdout.strip() else "")


def write(record: dict[str, Any], args: argparse.Namespace) -> list[str]:
  meta = record["meta"]
  base = os.path.join(args.out, stem(record, args))
  os.makedirs(args.out, exist_ok=True)
  paths = []
  for name, t in record["tasks"].items():
    if not args.no_plot:
      path = f"{base}-{name}.png"
      figure(path, name, t, meta["seeds"])
      t["figure"] = os.path.relpath(path, args.out)
      paths.append(path)
      if not args.quick and os.path.abspath(args.out) == RESULTS:
        shutil.copy(path, os.path.join(FIGURES, f"stability_{name}.png"))
  md = markdown(record)
  print(md)
  with open(base + ".json", "w") as f:
    json.dump(finite_only(record), f, indent=1, default=_json_default)
    f.write("\n")
  with open(base + ".md", "w") as f:
    f.write(md + "\n")
  paths = [base + ".json", base + ".md", *paths]
  print("\nWrote " + ", ".join(paths), file=sys.stderr)
  return paths


def finite_only(x: Any) -> Any:
  """``x`` with every NaN or infinity replaced by None (strict JSON)."""
  if isinstance(x, dict):
    return {k: finite_only(v) for k, v in x.items()}
  if isinstance(x, list | tuple):
    return [finite_only(v) for v in x]
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def _json_default(x):
  if hasattr(x, "item"):
    return x.item()
  raise TypeError(type(x).__name__)


if __name__ == "__main__":
  main()
