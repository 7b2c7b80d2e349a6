"""``python -m benchmarks.determinism``: the cost of a layout-independent norm.

``oc.norm_parts`` (and ``clip_by_global_norm(reproducible=True)``) adds up
each element's scaled ``|x| ** p`` as an exact fixed-point number in int32
limbs, so the norm is the same bits on every mesh, sharding and pipeline
split. That takes a pass for the largest element and a pass for the limbs,
where ``oc.global_norm`` makes one float32 pass. This times, interleaved
(medians over ``--reps``), under ``jax.jit`` on the default device:

- ``global_norm`` against ``norm_parts(...).norm()`` on one flat vector and on
  a tree of ``--leaves`` leaves of ``--size`` elements in total;
- ``chain(clip_by_global_norm(1.0), adamw)`` with ``reproducible`` off and on;
- the bytes bound: one read of the tree at the measured ``x + 0`` bandwidth.

It also compiles both norms on 1 and on 8 host devices (in one process with
``--xla_force_host_platform_device_count=8``, sharded along the leading axis)
and reports whether each norm is the same bits on both layouts and the ulp
difference where it is not. Writes
``benchmarks/results/determinism-<platform>-<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _tree(size: int, leaves: int):
  import numpy as np
  rng = np.random.default_rng(0)
  per = max(size // leaves // 256, 1)
  # Leaves of mixed magnitudes, as layers' gradients are.
  return {f"l{i:03d}": (rng.normal(size=(per, 256)) * 10.0 ** (i % 7 - 3)
                        ).astype(np.float32) for i in range(leaves)}


def _ulps(a, b) -> int:
  import numpy as np
  ia = np.asarray(a, np.float32).view(np.int32).astype(np.int64)
  ib = np.asarray(b, np.float32).view(np.int32).astype(np.int64)
  return int(abs(ia - ib))


def layouts(size: int, leaves: int) -> dict[str, object]:
  """Each norm on 1 and 8 devices: same bits? (Run with 8 host devices.)"""
  import numpy as np

  rng = np.random.default_rng(11)  # tests/test_devices.py's layout tree
  small = {"w": rng.normal(size=(16, 8)).astype(np.float32),
           "b": (rng.normal(size=(8,)) * 1e3).astype(np.float32),
           "e": (rng.normal(size=(24, 8)) * 1e-3).astype(np.float32)}
  out: dict[str, object] = {}
  for tname, tree in (("large", _tree(size, leaves)), ("small", small)):
    out.update({f"{k}/{tname}": v for k, v in _layouts(tree).items()})
  return out


def _layouts(tree):
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import optaxclip as oc

  one = jax.device_put(tree, jax.devices()[0])
  out: dict[str, object] = {}
  for kind in ("1d", "2d"):
    if kind == "1d":
      mesh = jax.make_mesh((8,), ("d",))
      spec = P("d")
    else:
      mesh = jax.make_mesh((2, 4), ("d", "m"))
      spec = P("d", "m")
    def spec_of(v, spec=spec):
      if v.ndim < 2 or v.shape[0] % 8 or v.shape[-1] % 4:
        return P("d") if v.shape[0] % 8 == 0 else P()
      return spec

    put = {k: jax.device_put(v, NamedSharding(mesh, spec_of(v)))
           for k, v in tree.items()}
    names = mesh.axis_names
    specs = {k: v.sharding.spec for k, v in put.items()}
    for name, fn in (("global_norm", oc.global_norm),
                     ("norm_parts", lambda t, **k: oc.norm_parts(t, **k).norm())):
      a = float(jax.jit(fn)(one))
      b = float(jax.jit(fn)(put))
      c = float(jax.jit(jax.shard_map(
          lambda t, fn=fn, names=names: fn(t, axis_name=names), mesh=mesh,
          in_specs=(specs,), out_specs=P()))(put))
      out[f"{name}/{kind}"] = {"one_device": a, "eight_devices": b,
                              "ulps": _ulps(a, b)}
      out[f"{name}/{kind}_shard_map"] = {"one_device": a, "eight_devices": c,
                                         "ulps": _ulps(a, c)}
  return out


def timings(size: int, leaves: int, reps: int) -> dict[str, object]:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  import optaxclip as oc
  from benchmarks import timing

  trees = {"flat": {"x": np.random.default_rng(0).normal(size=(size,)).astype(
      np.float32)}, "tree": _tree(size, leaves)}
  cases, sizes = [], {}
  for tname, tree in trees.items():
    dev = jax.device_put(tree)
    sizes[tname] = sum(v.size for v in tree.values())
    for name, fn in (
        ("global_norm", oc.global_norm),
        ("norm_parts", lambda t: oc.norm_parts(t).norm()),
        ("copy_bound", lambda t: jax.tree.map(lambda x: x + 0, t))):
      cases.append(timing.jax_case(
          f"{tname}/{name}", "optaxclip",
          (lambda f: lambda t: (f(t), t))(fn), lambda d=dev: (d,), ()))
    for rep in (False, True):
      opt = optax.chain(oc.clip_by_global_norm(1.0, reproducible=rep),
                        optax.adamw(1e-3))
      state = opt.init(dev)

      def step(g, s, opt=opt):
        u, s = opt.update(g, s, g)
        return u, s

      cases.append(timing.jax_case(
          f"{tname}/chain_adamw_reproducible={rep}", "optaxclip", step,
          lambda d=dev, s=state: (d, s), ()))
  times = timing.interleave(cases, reps, 2)
  med = {k: timing.median(v) for k, v in times.items()}
  return {"sizes": sizes, "median_seconds": med,
          "all_seconds": {k: list(v) for k, v in times.items()},
          "device": str(jax.devices()[0].device_kind),
          "platform": jax.default_backend(), "jax": jax.__version__,
          "dtype": str(jnp.float32.dtype)}


def _device_name(info: dict) -> str:
  if info["platform"] == "cpu":
    cpu = platform.processor() or "cpu"
    try:
      text = open("/proc/cpuinfo").read()
      model = re.search(r"model name\s*:\s*(.*)", text).group(1)
      cpu = ("amd-epyc" if "EPYC" in model else "intel-xeon" if "Xeon" in model
             else re.sub(r"\W+", "-", model)[:20])
    except (OSError, AttributeError):
      pass
    return f"cpu-{cpu.lower()}-{os.cpu_count()}c"
  return re.sub(r"\W+", "-", info["device"]).strip("-").lower()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", type=int, default=1 << 22)
  parser.add_argument("--leaves", type=int, default=64)
  parser.add_argument("--reps", type=int, default=15)
  parser.add_argument("--layouts-only", action="store_true")
  parser.add_argument("--no-write", action="store_true")
  args = parser.parse_args()
  if args.layouts_only:
    print(json.dumps(layouts(args.size, args.leaves)))
    return
  info = timings(args.size, args.leaves, args.reps)
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.determinism", "--layouts-only",
       "--size", str(min(args.size, 1 << 20)), "--leaves", str(args.leaves)],
      env=env, capture_output=True, text=True, check=True,
      cwd=os.path.dirname(RESULTS.rstrip("/").rsplit("/", 1)[0]) or ".")
  info["layouts"] = json.loads(proc.stdout.strip().splitlines()[-1])
  med = info["median_seconds"]
  lines = [
      "# The cost of a layout-independent norm", "",
      f"`python -m benchmarks.determinism --size {args.size} --leaves"
      f" {args.leaves} --reps {args.reps}` on {_device_name(info)}"
      f" (jax {info['jax']}): medians of {args.reps} interleaved jitted"
      " calls, float32.", "",
      "| tree | global_norm (ms) | norm_parts (ms) | ratio | copy bound (ms)"
      " | chain+adamw (ms) | reproducible chain+adamw (ms) | ratio |",
      "|---|---|---|---|---|---|---|---|"]
  for t in ("flat", "tree"):
    g, n, c = (med[f"{t}/{k}"] for k in ("global_norm", "norm_parts",
                                          "copy_bound"))
    a = med[f"{t}/chain_adamw_reproducible=False"]
    b = med[f"{t}/chain_adamw_reproducible=True"]
    lines.append(f"| {t} ({info['sizes'][t]} elements) | {g * 1e3:.2f} |"
                 f" {n * 1e3:.2f} | {n / g:.2f} | {c * 1e3:.2f} |"
                 f" {a * 1e3:.2f} | {b * 1e3:.2f} | {b / a:.2f} |")
  lines += ["", "The same tree on one device and sharded over 8 host devices"
            " (`1d`: leading axis; `2d`: a 2x4 mesh), under `jit` and inside"
            " `shard_map` (`axis_name`):", "",
            "| norm | layout | one device | eight devices | ulps apart |",
            "|---|---|---|---|---|"]
  for key, v in info["layouts"].items():
    name, kind, tname = key.split("/")
    lines.append(f"| {name} | {tname} tree, {kind} | {v['one_device']!r} |"
                 f" {v['eight_devices']!r} | {v['ulps']} |")
  text = "\n".join(lines) + "\n"
  print(text)
  if not args.no_write:
    stem = os.path.join(RESULTS, f"determinism-{_device_name(info)}")
    with open(stem + ".json", "w") as f:
      json.dump(info, f, indent=1)
    with open(stem + ".md", "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
