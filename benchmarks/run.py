"""Runs the measurement groups and collects one row per timed case."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax

import optaxclip as oc
from benchmarks import suite, timing


@dataclasses.dataclass
class Config:
  trees: Sequence[str]
  dtypes: Sequence[str]
  reps: int
  chained_reps: int
  compile_reps: int
  warmup: int
  torch: bool
  specs: Sequence[str] | None = None  # Keys to keep; None for all.
  chained: bool = True
  compile: bool = True


QUICK = dict(trees=("mlp", "resnet50"), dtypes=("float32", "bfloat16"),
             reps=10, chained_reps=5, compile_reps=1, warmup=2)
FULL = dict(trees=("mlp", "resnet50", "gpt2"), dtypes=("float32", "bfloat16"),
            reps=30, chained_reps=15, compile_reps=3, warmup=3)


def write_results(out: str, stem: str, data: dict[str, Any], md: str
                  ) -> list[str]:
  """Writes ``<out>/<stem>.json`` and ``.md``; returns their paths."""
  os.makedirs(out, exist_ok=True)
  base = os.path.join(out, stem)
  with open(base + ".json", "w") as f:
    json.dump(data, f, indent=1)
    f.write("\n")
  with open(base + ".md", "w") as f:
    f.write(md + "\n")
  return [base + ".json", base + ".md"]


def machine_name() -> tuple[str, str]:
  """``(platform, device)`` for file names, e.g. ``("cpu", "amd-epyc-2c")``."""
  backend = jax.default_backend()
  if backend == "cpu":
    model = _cpu_model()
    device = f"{model}-{os.cpu_count()}c"
  else:
    device = jax.devices()[0].device_kind
  return backend, _slug(device)


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine() or "cpu"


def _slug(s: str) -> str:
  return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-") or "unknown"


def metadata(cfg: Config, argv: Sequence[str]) -> dict[str, Any]:
  backend, device = machine_name()
  versions = {"python": platform.python_version(), "jax": jax.__version__,
              "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__")
              else None, "optax": optax.__version__,
              "optaxclip": oc.__version__}
  if cfg.torch:
    import torch
    versions["torch"] = torch.__version__
    torch_threads = torch.get_num_threads()
  else:
    torch_threads = None
  return {
      "command": "python -m benchmarks " + " ".join(argv),
      "date_utc": datetime.datetime.now(datetime.UTC).strftime(
          "%Y-%m-%d %H:%M:%S"),
      "platform": backend, "device": device,
      "device_kind": jax.devices()[0].device_kind,
      "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
      "torch_threads": torch_threads,
      "versions": versions, "config": dataclasses.asdict(cfg),
      "notes": [] if cfg.torch else [
          "torch is not installed: its rows are skipped"
          " (pip install torch to add them)."],
  }


def count_ticks(cfg: Config, specs: list[suite.Spec]) -> int:
  per = len(specs) * cfg.reps + cfg.reps
  if cfg.chained:
    per += len(specs) * cfg.chained_reps
  if cfg.compile:
    per += sum(1 for s in specs if any(b.impl == "optax" for b in s.baselines))
  return per * len(cfg.trees) * len(cfg.dtypes)


def run(cfg: Config, tick: Callable[[], None] = lambda: None,
        log: Callable[[str], None] = lambda s: None) -> list[dict[str, Any]]:
  specs = suite.specs(cfg.torch)
  if cfg.specs is not None:
    specs = [s for s in specs if s.key in cfg.specs]
  rows: list[dict[str, Any]] = []
  for tree in cfg.trees:
    for dtype in cfg.dtypes:
      ctx = suite.make_context(tree, dtype)
      base = {"tree": tree, "dtype": dtype, "params": ctx.size,
              "leaves": len(jax.tree_util.tree_leaves(ctx.grads)),
              "tree_bytes": ctx.nbytes}
      for spec in specs:
        log(f"{tree} {dtype} standalone {spec.name}")
        rows += _standalone(spec, ctx, cfg, tick, base)
      log(f"{tree} {dtype} global norm")
      rows += _norm(ctx, cfg, tick, base)
      if cfg.chained:
        for spec in specs:
          log(f"{tree} {dtype} chained {spec.name}")
          rows += _chained(spec, ctx, cfg, tick, base)
      if cfg.compile:
        for spec in specs:
          log(f"{tree} {dtype} compile {spec.name}")
          pair = suite.compile_pair(spec, ctx, cfg.compile_reps)
          if pair is None:
            continue
          tick()
          rows.append({**base, "section": "compile", "transform": spec.name,
                       "optaxclip_s": pair["optaxclip"],
                       "optax_s": pair["optax"],
                       "ratio": pair["optaxclip"] / pair["optax"]})
      del ctx
  return rows


def _bound_row(times, ctx, base, section, transform):
  t = timing.median(times)
  bw = 2 * ctx.nbytes / t
  return {**base, "section": section, "transform": transform,
          "name": "in-place scale (bound)", "impl": "bound",
          "time_ms": 1e3 * t, "passes": 2, "bytes": 2 * ctx.nbytes,
          "gbps": bw / 1e9, "frac_bound": 1.0}, bw


def _standalone(spec, ctx, cfg, tick, base):
  cases = [suite.bound_case(ctx), suite.transform_case(
      f"optaxclip.{spec.name}", "optaxclip", spec.make(ctx), ctx,
      spec.needs_params)]
  for b in spec.baselines:
    if b.impl == "torch":
      cases.append(suite.torch_case(b.name, b.make(ctx), ctx))
    else:
      cases.append(suite.transform_case(b.name, b.impl, b.make(ctx), ctx,
                                        spec.needs_params))
  times = timing.interleave(cases, cfg.reps, cfg.warmup, tick)
  bound, bw = _bound_row(times[cases[0].name], ctx, base, "standalone",
                         spec.name)
  rows = [bound]
  ours_t = timing.median(times[cases[1].name])
  moved = spec.passes * ctx.nbytes
  for c in cases[1:]:
    t = timing.median(times[c.name])
    rows.append({
        **base, "section": "standalone", "transform": spec.name,
        "name": c.name, "impl": c.impl, "time_ms": 1e3 * t,
        "time_ms_p10": 1e3 * _quantile(times[c.name], 0.1),
        "time_ms_p90": 1e3 * _quantile(times[c.name], 0.9),
        "passes": spec.passes, "bytes": moved, "gbps": moved / t / 1e9,
        "frac_bound": moved / t / bw,
        "ours_over_this": None if c is cases[1] else ours_t / t,
        "temp_bytes": timing.temp_bytes(c.compiled) if c.compiled else None,
    })
  return rows


def _norm(ctx, cfg, tick, base):
  """The global norm alone: float32 accumulation vs optax's own."""
  def case(name, impl, fn):
    return timing.jax_case(name, impl, lambda g: (fn(g),),
                           lambda: (ctx.grads,), donate=())
  cases = [suite.bound_case(ctx),
           case("optaxclip.global_norm", "optaxclip", oc.global_norm),
           case("optax.tree.norm", "optax", optax.tree.norm)]
  times = timing.interleave(cases, cfg.reps, cfg.warmup, tick)
  bound, bw = _bound_row(times[cases[0].name], ctx, base, "norm",
                         "global_norm")
  rows = [bound]
  ours_t = timing.median(times[cases[1].name])
  for c in cases[1:]:
    t = timing.median(times[c.name])
    rows.append({**base, "section": "norm", "transform": "global_norm",
                 "name": c.name, "impl": c.impl, "time_ms": 1e3 * t,
                 "passes": 1, "bytes": ctx.nbytes,
                 "gbps": ctx.nbytes / t / 1e9, "frac_bound": ctx.nbytes / t / bw,
                 "ours_over_this": None if c is cases[1] else ours_t / t})
  return rows


def _chained(spec, ctx, cfg, tick, base):
  cases = [suite.chained_case("adamw", "optax", suite.adamw(), ctx)]
  makers = [("optaxclip", f"optaxclip.{spec.name}", spec.make)] + [
      (b.impl, b.name, b.make) for b in spec.baselines if b.impl == "optax"]
  for impl, name, make in makers:
    cases.append(suite.chained_case(
        suite.chained_name(spec, make, name), impl,
        suite.chain_with(spec, make, ctx), ctx))
  times = timing.interleave(cases, cfg.chained_reps, cfg.warmup, tick)
  adamw_t = timing.median(times["adamw"])
  rows = []
  for c in cases[1:]:
    t = timing.median(times[c.name])
    rows.append({**base, "section": "chained", "transform": spec.name,
                 "name": c.name, "impl": c.impl, "time_ms": 1e3 * t,
                 "adamw_ms": 1e3 * adamw_t, "ratio": t / adamw_t,
                 "bytes_bound_ratio": suite.bytes_bound_ratio(spec)})
  return rows


def _quantile(xs, q):
  s = sorted(xs)
  return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]


def log_stderr(msg: str) -> None:
  print(msg, file=sys.stderr)
