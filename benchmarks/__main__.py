"""``python -m benchmarks [--quick]``: time every optaxclip transform under jit.

Prints Markdown tables and writes JSON, Markdown and a PNG chart to
``benchmarks/results/<platform>-<device>.*`` (``-quick`` added in quick mode).
``python -m benchmarks --device [--tiny]`` runs the headline rows within 8
minutes instead (``benchmarks.device``).
"""

from __future__ import annotations

import argparse
import os
import sys

from benchmarks import report, run, suite, timing, trees

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse(argv):
  p = argparse.ArgumentParser(
      prog="python -m benchmarks",
      description="Time optaxclip's transforms under jax.jit against optax,"
      " torch and the machine's memory bound.")
  p.add_argument("--device", action="store_true",
                 help="only the headline rows, within 8 minutes, sized for an"
                 " accelerator (python -m benchmarks.device; --device --help"
                 " for its options).")
  p.add_argument("--quick", action="store_true",
                 help="CI-sized run: small trees, few repetitions.")
  p.add_argument("--trees", help="comma-separated, from: "
                 + ", ".join(trees.TREES))
  p.add_argument("--dtypes", help="comma-separated: float32, bfloat16")
  p.add_argument("--only", help="comma-separated transform keys (value, value_stats, norm,"
                 " block_rms, global_norm, agc, quantile, zclip, skip_step)")
  p.add_argument("--reps", type=int, help="timed repetitions per case")
  p.add_argument("--chained-reps", type=int)
  p.add_argument("--compile-reps", type=int)
  p.add_argument("--warmup", type=int)
  p.add_argument("--no-torch", action="store_true", help="skip torch rows")
  p.add_argument("--no-chained", action="store_true")
  p.add_argument("--no-compile", action="store_true")
  p.add_argument("--no-plot", action="store_true")
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--out", default=RESULTS, help="output folder")
  p.add_argument("--name", help="file stem (default <platform>-<device>)")
  return p.parse_args(argv)


def config(args) -> run.Config:
  d = dict(run.QUICK if args.quick else run.FULL)
  if args.trees:
    d["trees"] = tuple(args.trees.split(","))
  if args.dtypes:
    d["dtypes"] = tuple(args.dtypes.split(","))
  for k in ("reps", "chained_reps", "compile_reps", "warmup"):
    if getattr(args, k) is not None:
      d[k] = getattr(args, k)
  for t in d["trees"]:
    if t not in trees.TREES:
      raise SystemExit(f"unknown tree {t!r}; choose from {list(trees.TREES)}")
  for t in d["dtypes"]:
    if t not in trees.DTYPES:
      raise SystemExit(f"unknown dtype {t!r}; choose from "
                       f"{list(trees.DTYPES)}")
  return run.Config(
      **d, torch=suite.torch_available() and not args.no_torch,
      specs=tuple(args.only.split(",")) if args.only else None,
      chained=not args.no_chained, compile=not args.no_compile)


def main(argv=None) -> list[str]:
  argv = sys.argv[1:] if argv is None else list(argv)
  if "--device" in argv:
    from benchmarks import device
    return device.main([a for a in argv if a != "--device"])
  args = parse(argv)
  cfg = config(args)
  meta = run.metadata(cfg, argv)
  specs = suite.specs(cfg.torch)
  if cfg.specs is not None:
    specs = [s for s in specs if s.key in cfg.specs]
  total = run.count_ticks(cfg, specs)
  bar = None
  if not args.no_progress:
    from tqdm import tqdm
    bar = tqdm(total=total, file=sys.stderr, unit="round", dynamic_ncols=True)
  tick = bar.update if bar is not None else (lambda n: None)
  log = bar.set_description if bar is not None else (lambda s: None)
  try:
    rows = run.run(cfg, tick=lambda: tick(1), log=log)
  finally:
    if bar is not None:
      bar.close()
  meta["peak_device_bytes"] = timing.peak_device_bytes()
  tgts = report.targets(rows)
  md = report.markdown(meta, rows, tgts)
  print(md)
  stem = args.name or "-".join(run.machine_name()) + ("-quick" if args.quick
                                                      else "")
  paths = report.write(args.out, stem, meta, rows, tgts, md,
                       plot=not args.no_plot)
  print("\nWrote " + ", ".join(paths), file=sys.stderr)
  return paths


if __name__ == "__main__":
  main()
