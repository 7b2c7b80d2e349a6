"""``python -m benchmarks.spectral``: spectral clipping against AdamW alone.

Times ``update`` + ``apply_updates`` with donated parameters and optimizer
state (the MLP 784-512-512-10, float32, by default) for AdamW alone, for
``oc.clip_by_spectral_norm`` before AdamW (clipping the gradient; with the
default ``ns_steps=10``, with 5, and ``soft=True``), for SPECTRA's
post-clip (``scale_by_adam``, the clip, weight decay, learning rate), and
for ``oc.clip_by_global_norm`` before AdamW, for scale. The threshold is half
the median spectral norm of the gradient's matrices, so that the clip acts.
All cases run interleaved; each time is the median over the rounds. Writes
``benchmarks/results/spectral-<platform>-<device>.{md,json}``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import jax
import numpy as np
import optax

import optaxclip as oc
from benchmarks import run, suite, timing, trees

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def threshold(ctx: suite.Context) -> float:
  """Half the median spectral norm of the gradient's matrices."""
  norms = [np.linalg.norm(np.asarray(x, np.float64), 2)
           for x in jax.tree_util.tree_leaves(ctx.grads) if x.ndim == 2]
  return 0.5 * float(np.median(norms))


def cases(ctx: suite.Context) -> dict[str, optax.GradientTransformation]:
  t = threshold(ctx)

  def spectra_post(**kw):
    return optax.chain(optax.scale_by_adam(),
                       oc.clip_by_spectral_norm(t, **kw),
                       optax.add_decayed_weights(1e-4),
                       optax.scale_by_learning_rate(1e-3))

  return {
      "adamw": suite.adamw(),
      "chain(oc.clip_by_global_norm, adamw)": optax.chain(
          oc.clip_by_global_norm(ctx.global_norm / 2), suite.adamw()),
      "chain(oc.clip_by_spectral_norm, adamw)": optax.chain(
          oc.clip_by_spectral_norm(t), suite.adamw()),
      "chain(oc.clip_by_spectral_norm(ns_steps=5), adamw)": optax.chain(
          oc.clip_by_spectral_norm(t, ns_steps=5), suite.adamw()),
      "chain(oc.clip_by_spectral_norm(soft=True), adamw)": optax.chain(
          oc.clip_by_spectral_norm(t, soft=True), suite.adamw()),
      "SPECTRA post-clip (scale_by_adam, clip, decay, lr)": spectra_post(),
  }


def main(argv=None) -> list[str]:
  argv = sys.argv[1:] if argv is None else list(argv)
  p = argparse.ArgumentParser(prog="python -m benchmarks.spectral",
                              description=__doc__.split("\n")[0])
  p.add_argument("--tree", default="mlp", choices=list(trees.TREES))
  p.add_argument("--reps", type=int, default=15)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--out", default=RESULTS)
  p.add_argument("--name", help="file stem (default spectral-<machine>)")
  args = p.parse_args(argv)
  ctx = suite.make_context(args.tree, "float32")
  table = cases(ctx)
  timed = [suite.chained_case(name, "", opt, ctx)
           for name, opt in table.items()]
  times = timing.interleave(timed, reps=args.reps, warmup=args.warmup)
  med = {name: timing.median(t) for name, t in times.items()}
  rows = [{"name": c.name, "ms": 1e3 * med[c.name],
           "ratio": med[c.name] / med["adamw"],
           "temp_mib": (timing.temp_bytes(c.compiled) or 0) / 2**20}
          for c in timed]
  meta = run.metadata(run.Config(trees=(args.tree,), dtypes=("float32",),
                                 reps=args.reps, chained_reps=args.reps,
                                 compile_reps=0, warmup=args.warmup,
                                 torch=False), argv)
  meta["command"] = "python -m benchmarks.spectral " + " ".join(argv)
  meta["date_utc"] = datetime.datetime.now(datetime.UTC).strftime(
      "%Y-%m-%d %H:%M:%S")
  meta["threshold"] = threshold(ctx)
  lines = [
      f"# Spectral clipping, {args.tree} float32, {meta['device']}",
      "",
      f"`{meta['command'].strip()}`, {meta['date_utc']} UTC; jax"
      f" {jax.__version__}, optax {optax.__version__}. Update +"
      " `apply_updates`, parameters and optimizer state donated; medians of"
      f" {args.reps} interleaved rounds after {args.warmup} warm-up rounds;"
      f" threshold {meta['threshold']:.4g} (half the median spectral norm).",
      "",
      "| step | ms | / AdamW alone | temp MiB |",
      "| --- | --- | --- | --- |",
  ]
  for r in rows:
    lines.append(f"| `{r['name']}` | {r['ms']:.2f} | {r['ratio']:.2f} |"
                 f" {r['temp_mib']:.1f} |")
  md = "\n".join(lines)
  print(md)
  stem = args.name or "spectral-" + "-".join(run.machine_name())
  return run.write_results(args.out, stem, {"meta": meta, "rows": rows}, md)


if __name__ == "__main__":
  main()
