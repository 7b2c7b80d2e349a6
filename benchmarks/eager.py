"""``python -m benchmarks.eager``: un-jitted ``update`` calls against optax's.

Users call ``update`` eagerly in notebooks, in their own tests and under a
debugger. Each optaxclip transform's eager ``update`` is timed beside its
optax twin's on the same small trees (two leaves; an MLP of 8 leaves),
interleaved round by round, medians. The first call of each (where both
libraries trace, and optaxclip compiles) is timed apart. Targets: at most 10x
the optax twin per call, and at most 5 ms per call on the two-leaf tree for a
transform without a twin. Writes
``benchmarks/results/eager-<platform>-<device>.{md,json}``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

import optaxclip as oc
from benchmarks import run

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TWIN_RATIO = 10.0
ALONE_MS = 5.0


def trees() -> dict[str, dict[str, jax.Array]]:
  two = {"w": jnp.full((3, 2), 10.0), "b": jnp.ones(2)}
  mlp = {}
  for i, (a, b) in enumerate([(64, 128), (128, 128), (128, 128), (128, 10)]):
    mlp[f"layer{i}/kernel"] = jnp.full((a, b), 0.1)
    mlp[f"layer{i}/bias"] = jnp.full((b,), 0.1)
  return {"two leaves": two, "mlp, 8 leaves": mlp}


def pairs() -> dict[str, tuple[optax.GradientTransformation,
                               optax.GradientTransformation | None]]:
  """Transform name -> (optaxclip's, optax's twin or None)."""
  sgd = optax.sgd(0.1)
  return {
      "clip_by_global_norm": (oc.clip_by_global_norm(1.0),
                              optax.clip_by_global_norm(1.0)),
      "clip_by_norm(ord='rms')": (oc.clip_by_norm(1.0, ord="rms"),
                                  optax.clip_by_block_rms(1.0)),
      "clip_by_value": (oc.clip_by_value(1.0), optax.clip(1.0)),
      "adaptive_grad_clip": (oc.adaptive_grad_clip(0.1),
                             optax.adaptive_grad_clip(0.1)),
      "skip_step(sgd)": (oc.skip_step(sgd), optax.apply_if_finite(sgd, 3)),
      "clip_by_quantile": (oc.clip_by_quantile(), None),
      "zclip": (oc.zclip(), None),
      "adagc": (oc.adagc(), None),
      "clip_spikes": (oc.clip_spikes(), None),
  }


def _caller(tx, grads):
  state = tx.init(grads)

  def call():
    updates, _ = tx.update(grads, state, grads)
    jax.block_until_ready(updates)
  return call


def main(argv=None) -> list[str]:
  argv = sys.argv[1:] if argv is None else list(argv)
  p = argparse.ArgumentParser(prog="python -m benchmarks.eager",
                              description=__doc__.split("\n")[0])
  p.add_argument("--reps", type=int, default=50)
  p.add_argument("--out", default=RESULTS)
  p.add_argument("--name", help="file stem (default eager-<machine>)")
  args = p.parse_args(argv)
  rows = []
  for tree_name, grads in trees().items():
    calls, first = {}, {}
    for name, (ours, twin) in pairs().items():
      for impl, tx in (("optaxclip", ours), ("optax", twin)):
        if tx is None:
          continue
        call = _caller(tx, grads)
        start = time.perf_counter()
        call()
        first[(name, impl)] = time.perf_counter() - start
        calls[(name, impl)] = call
    times: dict = {k: [] for k in calls}
    for _ in range(args.reps):  # Round-robin: load falls on all alike.
      for k, call in calls.items():
        start = time.perf_counter()
        call()
        times[k].append(time.perf_counter() - start)
    for name, (_, twin) in pairs().items():
      ours = 1e3 * statistics.median(times[(name, "optaxclip")])
      theirs = (1e3 * statistics.median(times[(name, "optax")])
                if twin is not None else None)
      ratio = ours / theirs if theirs else None
      met = (ratio <= TWIN_RATIO if ratio is not None
             else ours <= ALONE_MS or tree_name != "two leaves")
      rows.append({"tree": tree_name, "transform": name, "optaxclip_ms": ours,
                   "optax_ms": theirs, "ratio": ratio,
                   "optaxclip_first_ms": 1e3 * first[(name, "optaxclip")],
                   "optax_first_ms": (1e3 * first[(name, "optax")]
                                      if twin is not None else None),
                   "met": bool(met)})
  meta = {"command": "python -m benchmarks.eager " + " ".join(argv),
          "date_utc": datetime.datetime.now(datetime.UTC).strftime(
              "%Y-%m-%d %H:%M:%S"),
          "device": "-".join(run.machine_name()),
          "versions": {"jax": jax.__version__, "optax": optax.__version__},
          "reps": args.reps}
  md = markdown(meta, rows)
  print(md)
  stem = args.name or "eager-" + "-".join(run.machine_name())
  return run.write_results(args.out, stem, {"meta": meta, "rows": rows}, md)


def markdown(meta, rows) -> str:
  def f(v, fmt):
    return "-" if v is None else format(v, fmt)

  lines = [
      f"# Un-jitted update calls, {meta['device']}", "",
      f"`{meta['command'].strip()}`, {meta['date_utc']} UTC; jax"
      f" {meta['versions']['jax']}, optax {meta['versions']['optax']}."
      f" Medians of {meta['reps']} interleaved calls after the first; the"
      " first call (tracing, and compiling for optaxclip) timed apart.", "",
      "| tree | transform | optaxclip ms | optax ms | ratio | first call"
      " ms (optaxclip / optax) | target |",
      "| --- | --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    target = (f"<= {TWIN_RATIO:g}x" if r["optax_ms"] is not None
              else f"<= {ALONE_MS:g} ms")
    lines.append(
        f"| {r['tree']} | `{r['transform']}` | {r['optaxclip_ms']:.3f} |"
        f" {f(r['optax_ms'], '.3f')} | {f(r['ratio'], '.2f')} |"
        f" {r['optaxclip_first_ms']:.0f} / {f(r['optax_first_ms'], '.0f')} |"
        f" {target}: {'met' if r['met'] else 'missed'} |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
