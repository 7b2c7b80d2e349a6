"""``python -m benchmarks.skip_step``: the step guards against the bare step.

Times ``update`` + ``apply_updates`` with donated parameters and optimizer
state (GPT-2 small, float32, by default) for AdamW alone, ``oc.skip_step``
around it and ``optax.apply_if_finite`` around it, and the same with
``clip_by_global_norm`` chained before AdamW. All cases run interleaved;
each time is the median over the rounds. Also counts the array copies XLA
inserts into each compiled step. Writes
``benchmarks/results/skip-step-<platform>-<device>.{md,json}``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys

import jax
import optax

import optaxclip as oc
from benchmarks import run, suite, timing, trees

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TARGET = 1.15


def cases(ctx: suite.Context) -> dict[str, tuple[str, optax.GradientTransformation]]:
  """Name -> (name of the bare step it is compared with, optimizer)."""
  def gn():
    return oc.clip_by_global_norm(ctx.global_threshold)

  def gn_adamw():
    return optax.chain(gn(), suite.adamw())

  return {
      "adamw": ("adamw", suite.adamw()),
      "oc.skip_step(adamw)": ("adamw", oc.skip_step(suite.adamw())),
      "optax.apply_if_finite(adamw)": (
          "adamw", optax.apply_if_finite(suite.adamw(), 10**6)),
      "chain(oc.clip_by_global_norm, adamw)": (
          "chain(oc.clip_by_global_norm, adamw)", gn_adamw()),
      "oc.skip_step(chain(oc.clip_by_global_norm, adamw))": (
          "chain(oc.clip_by_global_norm, adamw)", oc.skip_step(gn_adamw())),
      "optax.apply_if_finite(chain(oc.clip_by_global_norm, adamw))": (
          "chain(oc.clip_by_global_norm, adamw)",
          optax.apply_if_finite(gn_adamw(), 10**6)),
  }


def array_copies(compiled) -> int:
  """Copies of non-scalar arrays in a compiled step."""
  return len(re.findall(r"= \w+\[[\d,]+\]\S* copy\(", compiled.as_text()))


def main(argv=None) -> list[str]:
  argv = sys.argv[1:] if argv is None else list(argv)
  p = argparse.ArgumentParser(prog="python -m benchmarks.skip_step",
                              description=__doc__.split("\n")[0])
  p.add_argument("--tree", default="gpt2", choices=list(trees.TREES))
  p.add_argument("--reps", type=int, default=15)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--out", default=RESULTS)
  p.add_argument("--name", help="file stem (default skip-step-<machine>)")
  args = p.parse_args(argv)
  ctx = suite.make_context(args.tree, "float32")
  table = cases(ctx)
  timed = [suite.chained_case(name, "", opt, ctx)
           for name, (_, opt) in table.items()]
  times = timing.interleave(timed, reps=args.reps, warmup=args.warmup)
  med = {name: timing.median(t) for name, t in times.items()}
  rows = []
  for case in timed:
    base = table[case.name][0]
    rows.append({"name": case.name, "baseline": base,
                 "ms": 1e3 * med[case.name],
                 "ratio": med[case.name] / med[base],
                 "array_copies": array_copies(case.compiled),
                 "temp_mib": (timing.temp_bytes(case.compiled) or 0) / 2**20})
  meta = run.metadata(run.Config(trees=(args.tree,), dtypes=("float32",),
                                 reps=args.reps, chained_reps=args.reps,
                                 compile_reps=0, warmup=args.warmup,
                                 torch=False), argv)
  meta["command"] = "python -m benchmarks.skip_step " + " ".join(argv)
  meta["date_utc"] = datetime.datetime.now(datetime.UTC).strftime(
      "%Y-%m-%d %H:%M:%S")
  lines = [
      f"# Step guards, {args.tree} float32, {meta['device']}",
      "",
      f"`{meta['command'].strip()}`, {meta['date_utc']} UTC; jax"
      f" {jax.__version__}, optax {optax.__version__}. Update +"
      " `apply_updates`, parameters and optimizer state donated; medians of"
      f" {args.reps} interleaved rounds after {args.warmup} warm-up rounds.",
      "",
      "| step | ms | / bare step | array copies | temp MiB |",
      "| --- | --- | --- | --- | --- |",
  ]
  for r in rows:
    lines.append(f"| `{r['name']}` | {r['ms']:.1f} | {r['ratio']:.2f}"
                 f" (`{r['baseline']}`) | {r['array_copies']} |"
                 f" {r['temp_mib']:.1f} |")
  guard = [r for r in rows if r["name"].startswith("oc.skip_step")]
  lines += ["", f"Target: `oc.skip_step` at most {TARGET}x the bare step: "
            + ", ".join(f"{r['ratio']:.2f}x"
                        f" ({'met' if r['ratio'] <= TARGET else 'missed'})"
                        for r in guard) + "."]
  md = "\n".join(lines)
  print(md)
  stem = args.name or "skip-step-" + "-".join(run.machine_name())
  return run.write_results(args.out, stem, {"meta": meta, "rows": rows}, md)


if __name__ == "__main__":
  main()
