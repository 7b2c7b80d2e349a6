"""``python -m benchmarks.dp [--quick]``: per-example clipping, time and memory.

Times the sum of clipped per-example gradients of an MLP and a CNN at several
batch sizes, with and without microbatching, computed three ways:

- ``optaxclip.clipped_grad``;
- ``jax_privacy.clipping.clipped_grad`` (when ``jax-privacy`` is installed:
  ``pip install -e ".[dp]"``);
- ``jax.vmap(jax.grad)`` followed by ``optax.per_example_global_norm_clip``
  (no microbatching: optax has none).

Each is jitted; the time is the median over interleaved repetitions (every
repetition runs every implementation of one case in turn, so that load from
elsewhere on the machine falls on all alike), and the memory is XLA's
``compiled.memory_analysis()``: the temporary buffers the executable needs
(its peak scratch, on top of its arguments and outputs). Writes
``benchmarks/results/dp-<platform>-<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaxclip as oc
from benchmarks import run

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MAX_NORM = 1.0


def mlp_model(rng: np.random.Generator):
  """784-256-256-10, tanh: 270k parameters."""
  sizes = [784, 256, 256, 10]
  params = {f"w{i}": jnp.asarray(rng.standard_normal((a, b)) / np.sqrt(a),
                                 jnp.float32)
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))}
  params |= {f"b{i}": jnp.zeros(b) for i, b in enumerate(sizes[1:])}

  def apply(p, x):
    for i in range(len(sizes) - 2):
      x = jnp.tanh(x @ p[f"w{i}"] + p[f"b{i}"])
    i = len(sizes) - 2
    return x @ p[f"w{i}"] + p[f"b{i}"]

  return params, apply, (784,)


def cnn_model(rng: np.random.Generator):
  """28x28 input, conv 3x3x16 / 2, conv 3x3x32 / 2, dense 10: 25k parameters."""
  params = {
      "k1": jnp.asarray(rng.standard_normal((3, 3, 1, 16)) / 3, jnp.float32),
      "c1": jnp.zeros(16),
      "k2": jnp.asarray(rng.standard_normal((3, 3, 16, 32)) / 12, jnp.float32),
      "c2": jnp.zeros(32),
      "w": jnp.asarray(rng.standard_normal((7 * 7 * 32, 10)) / 40,
                       jnp.float32),
      "b": jnp.zeros(10),
  }

  def apply(p, x):
    dn = ("NHWC", "HWIO", "NHWC")
    x = jax.lax.conv_general_dilated(x, p["k1"], (2, 2), "SAME",
                                     dimension_numbers=dn)
    x = jax.nn.relu(x + p["c1"])
    x = jax.lax.conv_general_dilated(x, p["k2"], (2, 2), "SAME",
                                     dimension_numbers=dn)
    x = jax.nn.relu(x + p["c2"])
    return x.reshape(x.shape[0], -1) @ p["w"] + p["b"]

  return params, apply, (28, 28, 1)


MODELS = {"mlp": mlp_model, "cnn": cnn_model}


def make_loss(apply):
  def loss(params, x, y):
    logits = apply(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss


def implementations(loss, microbatch: int | None) -> dict[str, Callable]:
  grad_fn = oc.clipped_grad(loss, clip=MAX_NORM, batch_argnums=(1, 2),
                            microbatch_size=microbatch)
  # The gradients only, as the others return (the PerExampleInfo dropped).
  impls = {"optaxclip.clipped_grad": lambda p, x, y: grad_fn(p, x, y)[0]}
  try:
    from jax_privacy import clipping
  except ImportError:
    clipping = None
  if clipping is not None:
    impls["jax_privacy.clipped_grad"] = clipping.clipped_grad(
        loss, l2_clip_norm=MAX_NORM, batch_argnums=(1, 2),
        microbatch_size=microbatch)
  if microbatch is None:
    one = lambda p, x, y: loss(p, x[None], y[None])  # noqa: E731
    per_example = jax.vmap(jax.grad(one), in_axes=(None, 0, 0))

    def vmap_optax(params, x, y):
      grads = per_example(params, x, y)
      leaves, treedef = jax.tree.flatten(grads)
      total, _ = optax.per_example_global_norm_clip(leaves, MAX_NORM)
      return jax.tree.unflatten(treedef, total)

    impls["vmap + optax.per_example_global_norm_clip"] = vmap_optax
  return impls


def measure(model: str, batch: int, microbatch: int | None, reps: int,
            warmup: int) -> list[dict[str, Any]]:
  """One case: every implementation compiled, checked equal, then timed."""
  rng = np.random.default_rng(0)
  params, apply, shape = MODELS[model](rng)
  x = jnp.asarray(rng.standard_normal((batch,) + shape), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, batch))
  loss = make_loss(apply)
  compiled, rows = {}, []
  for name, fn in implementations(loss, microbatch).items():
    t0 = time.perf_counter()
    compiled[name] = jax.jit(fn).lower(params, x, y).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled[name].memory_analysis()
    rows.append({
        "model": model, "batch": batch, "microbatch": microbatch,
        "implementation": name, "compile_s": compile_s,
        "temp_bytes": getattr(mem, "temp_size_in_bytes", None),
        "argument_bytes": getattr(mem, "argument_size_in_bytes", None),
        "output_bytes": getattr(mem, "output_size_in_bytes", None)})
  reference = compiled["optaxclip.clipped_grad"](params, x, y)
  for name, c in compiled.items():  # Same numbers, or the timing means little.
    out = c(params, x, y)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(reference)):
      np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-5, err_msg=name)
  times: dict[str, list[float]] = {name: [] for name in compiled}
  for r in range(warmup + reps):
    for name, c in compiled.items():
      t0 = time.perf_counter()
      jax.block_until_ready(c(params, x, y))
      if r >= warmup:
        times[name].append(time.perf_counter() - t0)
  for row in rows:
    row["ms"] = 1e3 * statistics.median(times[row["implementation"]])
  return rows


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
  out = [f"# Per-example clipping benchmark: {meta['platform']} /"
         f" {meta['device']}", "",
         f"`{meta['command']}` on {meta['date']}; {meta['versions']}.", "",
         "Sum of per-example gradients clipped to norm 1, jitted. *ms*: median"
         f" of {meta['reps']} interleaved repetitions. *temp MiB*: XLA's"
         " `compiled.memory_analysis().temp_size_in_bytes`, the scratch"
         " memory of the executable (arguments and outputs not included)."
         " *ours/this*: optaxclip's time over this row's (below 1: optaxclip"
         " is faster). *microbatch* `-`: the whole batch at once.", "",
         "| model | batch | microbatch | implementation | ms | ours/this |"
         " temp MiB | compile s |", "| --- | --- | --- | --- | --- | --- | --- |"
         " --- |"]
  ours = {(r["model"], r["batch"], r["microbatch"]): r["ms"] for r in rows
          if r["implementation"] == "optaxclip.clipped_grad"}
  for r in rows:
    key = (r["model"], r["batch"], r["microbatch"])
    ratio = ("–" if r["implementation"] == "optaxclip.clipped_grad"
             else f"{ours[key] / r['ms']:.2f}")
    temp = ("–" if r["temp_bytes"] is None
            else f"{r['temp_bytes'] / 2**20:.1f}")
    out.append(f"| {r['model']} | {r['batch']} | {r['microbatch'] or '-'} |"
               f" {r['implementation']} | {r['ms']:.2f} | {ratio} | {temp} |"
               f" {r['compile_s']:.2f} |")
  return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  p = argparse.ArgumentParser(prog="python -m benchmarks.dp",
                              description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true",
                 help="batches 64 and 256 only, 3 repetitions")
  p.add_argument("--models", default="mlp,cnn")
  p.add_argument("--batches", help="comma-separated (default 64,256,1024)")
  p.add_argument("--microbatch", type=int, default=64,
                 help="microbatch size of the microbatched rows")
  p.add_argument("--reps", type=int)
  p.add_argument("--no-save", action="store_true")
  args = p.parse_args(argv)
  batches = [int(b) for b in (args.batches or (
      "64,256" if args.quick else "64,256,1024")).split(",")]
  reps = args.reps or (3 if args.quick else 7)
  rows = []
  for model in args.models.split(","):
    for batch in batches:
      for micro in (None, args.microbatch):
        if micro is not None and micro >= batch:
          continue
        rows += measure(model, batch, micro, reps, warmup=2)
        print(f"{model} batch {batch} microbatch {micro}: done", flush=True)
  backend, device = run.machine_name()
  versions = {"python": platform.python_version(), "jax": jax.__version__,
              "optax": optax.__version__, "optaxclip": oc.__version__}
  try:
    import jax_privacy
    versions["jax_privacy"] = getattr(jax_privacy, "__version__", "?")
  except ImportError:
    versions["jax_privacy"] = "not installed"
  meta = {"command": "python -m benchmarks.dp " + " ".join(argv),
          "date": datetime.datetime.now(datetime.UTC).strftime(
              "%Y-%m-%d %H:%M:%S UTC"),
          "platform": backend, "device": device, "reps": reps,
          "cpus": os.cpu_count(),
          "versions": ", ".join(f"{k} {v}" for k, v in versions.items())}
  text = markdown(rows, meta)
  print(text)
  if not args.no_save:
    os.makedirs(RESULTS, exist_ok=True)
    stem = os.path.join(RESULTS, f"dp-{backend}-{device}"
                        + ("-quick" if args.quick else ""))
    with open(stem + ".json", "w") as f:
      json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(stem + ".md", "w") as f:
      f.write(text)
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
  main()
