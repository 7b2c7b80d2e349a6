"""``python -m benchmarks.compile``: compile time and memory against optax.

For each clipper, leaf count and host device count, one fresh process lowers
and compiles ``jax.jit(optax.chain(clipper, optax.adamw(1e-3)).update)`` on a
tree of ``n`` leaves (``n / 3`` blocks of a 256x256 kernel, a 256 bias and a
256 scale; or, for a leaf count written ``500d``, ``n`` leaves each of a
shape of its own, so that no two can be grouped) and reports the compile seconds and the process's peak RSS growth
while compiling. Each optaxclip transform is compared with its optax twin (or
with ``optax.clip_by_global_norm`` where it has none) measured in the same run,
interleaved, medians over ``--reps`` fresh processes.

Writes ``benchmarks/results/compile-<platform>-<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# key: (expression building the transform, key of the optax reference).
CASES: dict[str, tuple[str, str]] = {
    "optax.clip": ("optax.clip(0.1)", ""),
    "optax.clip_by_block_rms": ("optax.clip_by_block_rms(1.0)", ""),
    "optax.clip_by_global_norm": ("optax.clip_by_global_norm(1.0)", ""),
    "optax.adaptive_grad_clip": ("optax.adaptive_grad_clip(0.01)", ""),
    "oc.clip_by_value": ("oc.clip_by_value(0.1)", "optax.clip"),
    "oc.clip_by_norm": ("oc.clip_by_norm(1.0)", "optax.clip_by_block_rms"),
    "oc.clip_by_global_norm": ("oc.clip_by_global_norm(1.0)",
                               "optax.clip_by_global_norm"),
    "oc.adaptive_grad_clip": ("oc.adaptive_grad_clip(0.01)",
                              "optax.adaptive_grad_clip"),
    "oc.clip_by_quantile": ("oc.clip_by_quantile()",
                            "optax.clip_by_global_norm"),
    "oc.zclip": ("oc.zclip()", "optax.clip_by_global_norm"),
    "oc.skip_step": ("SKIP", "optax.clip_by_global_norm"),
}


def tree_of(leaves: str) -> dict:
  """The benchmark tree: ``"300"`` in blocks of three, ``"500d"`` distinct."""
  import jax
  import jax.numpy as jnp

  if leaves.endswith("d"):  # Distinct shapes: (k, 64 + k % 7) for k = 1..n.
    return {f"leaf_{k:04d}": jax.ShapeDtypeStruct((k, 64 + k % 7),
                                                   jnp.float32)
            for k in range(1, int(leaves[:-1]) + 1)}
  tree = {}
  for i in range(int(leaves) // 3):
    tree[f"block_{i:03d}"] = {
        "kernel": jax.ShapeDtypeStruct((256, 256), jnp.float32),
        "bias": jax.ShapeDtypeStruct((256,), jnp.float32),
        "scale": jax.ShapeDtypeStruct((256,), jnp.float32)}
  return tree


def worker(expr: str, leaves: str) -> dict[str, float]:
  """Runs in a fresh process: compile one chained update, measure it."""
  import resource

  import jax
  import optax

  import optaxclip as oc  # noqa: F401  (used by the expressions)

  def rss_mb() -> float:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

  tree = tree_of(leaves)
  adamw = optax.adamw(1e-3)
  if expr == "SKIP":
    opt = oc.skip_step(adamw)
  else:
    opt = optax.chain(eval(expr), adamw)  # noqa: S307  (our own table)
  state = jax.eval_shape(opt.init, tree)
  fn = jax.jit(opt.update)
  before = rss_mb()
  peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  t0 = time.perf_counter()
  fn.lower(tree, state, tree).compile()
  seconds = time.perf_counter() - t0
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return {"seconds": seconds, "rss_growth_mb": peak - min(before, peak_before),
          "peak_rss_mb": peak, "devices": jax.device_count()}


def measure(expr: str, leaves: str, devices: int) -> dict[str, float]:
  env = dict(os.environ)
  flags = env.get("XLA_FLAGS", "").replace(
      "--xla_force_host_platform_device_count", "--xla_ignored_device_count")
  env["XLA_FLAGS"] = (flags + f" --xla_force_host_platform_device_count="
                      f"{devices}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  out = subprocess.run(
      [sys.executable, "-m", "benchmarks.compile", "--worker", expr,
       str(leaves)], env=env, capture_output=True, text=True, check=False,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  if out.returncode != 0:
    raise RuntimeError(f"{expr} at {leaves} leaves failed:\n{out.stderr}")
  row = json.loads(out.stdout.strip().splitlines()[-1])
  assert row["devices"] == devices, row
  return row


def run(keys: list[str], leaf_counts: list[str], device_counts: list[int],
        reps: int, log=print) -> list[dict]:
  rows = []
  for devices in device_counts:
    for leaves in leaf_counts:
      samples: dict[str, list[dict]] = {k: [] for k in keys}
      for r in range(reps):  # Interleaved: every case once per round.
        for k in keys:
          samples[k].append(measure(CASES[k][0], leaves, devices))
          log(f"  {devices} dev, {leaves} leaves, round {r}: {k} "
              f"{samples[k][-1]['seconds']:.2f} s")
      for k in keys:
        rows.append({
            "key": k, "reference": CASES[k][1], "leaves": leaves,
            "devices": devices,
            "seconds": statistics.median(s["seconds"] for s in samples[k]),
            "rss_growth_mb": statistics.median(
                s["rss_growth_mb"] for s in samples[k]),
            "samples": [s["seconds"] for s in samples[k]]})
  return rows


def ratios(rows: list[dict]) -> list[dict]:
  """Each optaxclip row against its optax reference in the same setting."""
  by = {(r["key"], r["leaves"], r["devices"]): r for r in rows}
  out = []
  for r in rows:
    ref = by.get((r["reference"], r["leaves"], r["devices"]))
    if not r["reference"] or ref is None:
      continue
    half = by.get((r["key"], str(int(r["leaves"]) // 2), r["devices"])
                  ) if r["leaves"].isdigit() else None
    out.append({
        "key": r["key"], "reference": r["reference"], "leaves": r["leaves"],
        "devices": r["devices"], "seconds": r["seconds"],
        "reference_seconds": ref["seconds"],
        "time_ratio": r["seconds"] / ref["seconds"],
        "rss_ratio": (r["rss_growth_mb"] / ref["rss_growth_mb"]
                      if ref["rss_growth_mb"] > 0 else float("nan")),
        "vs_half_leaves": (r["seconds"] / half["seconds"] if half
                           else float("nan"))})
  return out


def markdown(meta: dict, rows: list[dict]) -> str:
  lines = [
      "# Compile time of `chain(clipper, adamw).update` vs optax",
      "",
      f"`{meta['command']}` on {meta['machine']}, jax {meta['jax']}, optax"
      f" {meta['optax']}, {meta['date']}. Medians of {meta['reps']} fresh"
      " processes per case, interleaved. Targets: time <= 1.2x and compile"
      " RSS growth <= 1.5x the optax twin; 600 leaves <= 2.2x the time of"
      " 300.",
      "",
      "| clipper | devices | leaves | seconds | optax twin | twin seconds |"
      " time ratio | RSS ratio | vs half the leaves |",
      "|---|---|---|---|---|---|---|---|---|"]
  for r in ratios(rows):
    lines.append(
        f"| `{r['key']}` | {r['devices']} | {r['leaves']} |"
        f" {r['seconds']:.2f} | `{r['reference']}` |"
        f" {r['reference_seconds']:.2f} | {r['time_ratio']:.2f} |"
        f" {r['rss_ratio']:.2f} | {r['vs_half_leaves']:.2f} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> str:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv and argv[0] == "--worker":
    print(json.dumps(worker(argv[1], argv[2])))
    return ""
  p = argparse.ArgumentParser(prog="python -m benchmarks.compile")
  p.add_argument("--leaves", default="150,300,600",
                 help="comma-separated leaf counts; 500d: 500 leaves of"
                 " distinct shapes")
  p.add_argument("--devices", default="1,8")
  p.add_argument("--only", help="comma-separated keys (optax references are"
                 " added); default all")
  p.add_argument("--reps", type=int, default=1)
  p.add_argument("--name", help="file stem (default compile-<machine>)")
  p.add_argument("--out", default=RESULTS)
  args = p.parse_args(argv)
  keys = list(CASES)
  if args.only:
    wanted = args.only.split(",")
    keys = [k for k in CASES if k in wanted or any(
        CASES[w][1] == k for w in wanted if w in CASES)]
  import jax
  import optax

  from benchmarks import run as bench_run
  rows = run(keys, args.leaves.split(","),
             [int(x) for x in args.devices.split(",")], args.reps,
             log=lambda s: print(s, file=sys.stderr))
  meta = {"command": "python -m benchmarks.compile " + " ".join(argv),
          "machine": "-".join(bench_run.machine_name()),
          "jax": jax.__version__, "optax": optax.__version__,
          "date": time.strftime("%Y-%m-%d"), "reps": args.reps}
  md = markdown(meta, rows)
  print(md)
  stem = args.name or "compile-" + "-".join(bench_run.machine_name())
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, stem + ".json"), "w") as f:
    json.dump({"meta": meta, "rows": rows, "ratios": ratios(rows)}, f,
              indent=1)
  with open(os.path.join(args.out, stem + ".md"), "w") as f:
    f.write(md)
  return md


if __name__ == "__main__":
  main()
