"""``python -m benchmarks.compile_parts``: where per-leaf clipping's compile time goes.

Compiles ``jax.jit(optax.chain(clip, optax.adamw(1e-3)).update)`` on the tree
of ``benchmarks.compile`` (``n / 3`` blocks of a 256x256 kernel, a 256 bias
and a 256 scale) for a ladder of per-leaf clips, each adding one ingredient of
``oc.clip_by_norm`` to the one before:

1. ``optax.clip_by_block_rms``: the reference;
2. ``plain``: one norm per leaf and ``g * min(1, t / n)``, optax's semantics
   written the same way as 3 to 5;
3. ``exact rule``: the same norms, with optaxclip's scale rule
   (``_numerics.clip_factors``: defined at ``n = 0``, ``inf``, NaN, and exact
   where ``t / n`` is subnormal) evaluated per leaf;
4. ``grouped``: the norms stacked by leaf type, the rule evaluated once per
   group, each leaf's factor picked out (one pick per leaf), no overflow path;
5. ``grouped + cold path``: 4 with the ``lax.cond`` to the exact rescaled
   norms (``_norms.grouped_leaf_norms``), i.e. ``oc.clip_by_norm`` without
   its statistics;
6. ``oc.clip_by_norm``: with its default (scalar) statistics.

Each case is compiled in a fresh process, cases interleaved, medians over
``--reps``. Writes ``benchmarks/results/compile-parts-<platform>-<device>.md``.
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
CASES = ["optax.clip_by_block_rms", "plain", "exact rule", "grouped",
         "grouped + cold path", "oc.clip_by_norm"]


def make(case: str):
  """The clip of one rung of the ladder, as a stateless transformation."""
  import jax
  import jax.numpy as jnp
  import optax

  import optaxclip as oc
  from optaxclip import _apply, _norms, _numerics

  t = 1.0
  if case == "optax.clip_by_block_rms":
    return optax.clip_by_block_rms(t)
  if case == "oc.clip_by_norm":
    return oc.clip_by_norm(t)

  def plain(leaves):
    out = []
    for g in leaves:
      n = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
      out.append(g * jnp.minimum(1.0, t / n))
    return out

  def exact_rule(leaves):
    out = []
    for g in leaves:
      n = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
      out.append(_numerics.scale_leaf(g, _numerics.clip_factors(n, t)))
    return out

  def grouped(leaves, cold):
    axes = [tuple(range(x.ndim)) for x in leaves]
    if cold:
      groups, norms = _norms.grouped_leaf_norms(leaves, 2.0, axes)
    else:
      groups = _norms._groups(leaves, axes)  # noqa: SLF001
      norms = [_numerics.Norm(jnp.ones((len(g),)), jnp.sqrt(jnp.stack(
          [jnp.sum(jnp.square(leaves[i])) for i in g]))) for g in groups]
    ts = [jnp.asarray(t, jnp.float32)] * len(groups)
    return _apply.apply_grouped(leaves, groups, norms, ts)[0]

  fns = {"plain": plain, "exact rule": exact_rule,
         "grouped": lambda xs: grouped(xs, False),
         "grouped + cold path": lambda xs: grouped(xs, True)}

  def update(updates, state, params=None):
    del params
    leaves, treedef = jax.tree.flatten(updates)
    return jax.tree.unflatten(treedef, fns[case](leaves)), state

  return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


def worker(case: str, leaves: int) -> float:
  import jax
  import jax.numpy as jnp
  import optax

  tree = {f"block_{i:03d}": {
      "kernel": jax.ShapeDtypeStruct((256, 256), jnp.float32),
      "bias": jax.ShapeDtypeStruct((256,), jnp.float32),
      "scale": jax.ShapeDtypeStruct((256,), jnp.float32)}
          for i in range(leaves // 3)}
  opt = optax.chain(make(case), optax.adamw(1e-3))
  state = jax.eval_shape(opt.init, tree)
  lowered = jax.jit(opt.update).lower(tree, state, tree)
  t0 = time.perf_counter()
  lowered.compile()
  return time.perf_counter() - t0


def main(argv=None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--leaves", type=int, default=300)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  parser.add_argument("--out", default=RESULTS)
  args = parser.parse_args(argv)
  if args.worker:
    print(json.dumps(worker(args.worker, args.leaves)))
    return ""
  from benchmarks import run

  times: dict[str, list[float]] = {c: [] for c in CASES}
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  for _ in range(args.reps):
    for case in CASES:
      proc = subprocess.run(
          [sys.executable, "-m", "benchmarks.compile_parts", "--worker", case,
           "--leaves", str(args.leaves)], capture_output=True, text=True,
          env=env, check=True)
      times[case].append(float(proc.stdout.strip().splitlines()[-1]))
  base = statistics.median(times[CASES[0]])
  platform, device = run.machine_name()
  lines = [
      "# Where per-leaf clipping's compile time goes",
      "",
      f"`python -m benchmarks.compile_parts --leaves {args.leaves} --reps"
      f" {args.reps}` on {platform}-{device}: compile seconds of"
      " `chain(clip, adamw).update`, one host device, medians of"
      f" {args.reps} fresh processes per case, interleaved. Each row adds one"
      " ingredient to the row above (see the module docstring).",
      "",
      "| case | seconds | x block_rms | all runs |",
      "|---|---|---|---|"]
  for case in CASES:
    m = statistics.median(times[case])
    lines.append(f"| {case} | {m:.2f} | {m / base:.2f} |"
                 f" {', '.join(f'{v:.2f}' for v in times[case])} |")
  text = "\n".join(lines) + "\n"
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, f"compile-parts-{platform}-{device}.md")
  with open(path, "w") as f:
    f.write(text)
  print(text)
  return path


if __name__ == "__main__":
  main()
