"""``python -m benchmarks.device [--tiny]``: the headline rows in one call.

Runs, on whatever accelerator JAX sees (or the CPU), the rows that matter
most, in this order, within an overall time budget (default 420 s from the
start of ``main``, so that the whole command ends within 8 minutes):

1. ``norm``: the global norm alone, ``oc.global_norm`` against
   ``optax.tree.norm`` and the memory bound (a donated in-place scale of one
   flat buffer as large as the gradient tree);
2. ``standalone``: ``oc.clip_by_global_norm`` against
   ``optax.clip_by_global_norm`` and the bound;
3. ``chained``: ``chain(clipper, adamw)`` against AdamW alone, beside the
   ratio the extra bytes alone allow;
4. ``compile``: compile time of the chained update, optaxclip's clipper
   against optax's;
5. ``train_step``: a whole jitted train step of a decoder-only transformer
   (``benchmarks.train_step``) with no clipper, ``oc.clip_by_global_norm``,
   ``optax.clip_by_global_norm`` and ``oc.skip_step``;
6. ``ghost``: XLA's compiled memory of the plain gradient, ghost clipping and
   per-example (``vmap``) clipping (``benchmarks.ghost``).

The gradient trees, timing and cases are those of ``python -m benchmarks``,
``benchmarks.train_step`` and ``benchmarks.ghost``; only the sizes are chosen
here (``SIZES``). Before each group (and each train-step or ghost case) it
checks the time left against that group's estimate and, when the budget is
near, stops adding rows and says which it left out. Writes
``benchmarks/results/device-<device kind>.{json,md}`` (``-tiny`` added with
``--tiny``), with the command, versions and date. ``python -m benchmarks
--device`` is the same command.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import optaxclip as oc
from benchmarks import run, suite, timing, train_step

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# Counted from the call of ``main``: leaves a minute of the 8 for the imports,
# the backend's start-up and a group that runs past its estimate.
BUDGET_S = 420.0
GROUPS = ("norm", "standalone", "chained", "compile", "train_step", "ghost")


@dataclasses.dataclass(frozen=True)
class Size:
  """How large each group is.

  Attributes:
    tree: gradient tree of ``benchmarks.trees`` (float32).
    reps, chained_reps, warmup, compile_reps: as in ``python -m benchmarks``.
    model: the train-step model.
    train_cases: the train steps timed (keys of ``train_step.cases()``), the
      bare step first.
    rounds, train_warmup: the train step's timed and warm-up rounds.
    compiler_options: XLA's options for the train steps (``None``: the
      defaults).
    ghost: ``(model, batch, seq)`` of ``benchmarks.ghost``.
    ghost_methods: the gradient computations of ``benchmarks.ghost``
      compiled.
    estimate_s: a generous guess of each group's seconds, compile included;
      a group starts only when that much of the budget is left.
  """

  tree: str
  reps: int
  chained_reps: int
  warmup: int
  compile_reps: int
  model: train_step.Model
  train_cases: tuple[str, ...]
  rounds: int
  train_warmup: int
  compiler_options: dict[str, Any] | None
  ghost: tuple[str, int, int]
  ghost_methods: tuple[str, ...]
  estimate_s: dict[str, float]


SIZES = {
    # GPT-2 small's gradients (124M parameters, 498 MB in float32); a
    # 6-layer, width-768 language model (about 55M parameters) with 8
    # sequences of 512 tokens; ghost clipping of benchmarks.ghost's 10M
    # parameter transformer on 256 sequences of 128 tokens.
    "accelerator": Size(
        tree="gpt2", reps=50, chained_reps=30, warmup=5, compile_reps=2,
        model=train_step.Model(vocab=8192, d_model=768, layers=6, heads=12,
                               seq=512, batch=8),
        train_cases=("adamw", "oc.clip_by_global_norm(1.0)",
                     "optax.clip_by_global_norm(1.0)", "oc.skip_step(adamw)"),
        rounds=30, train_warmup=3, compiler_options=None,
        ghost=("transformer", 256, 128),
        ghost_methods=("non-private", "ghost", "vmap"),
        estimate_s={"norm": 20, "standalone": 30, "chained": 40,
                    "compile": 40, "train_step": 150, "ghost": 120}),
    # Each group's code on the fewest cases: the bare step and one clipper,
    # the plain gradient and ghost clipping.
    "tiny": Size(
        tree="tiny", reps=3, chained_reps=2, warmup=1, compile_reps=1,
        model=train_step.MODELS["quick"],
        train_cases=("adamw", "oc.clip_by_global_norm(1.0)"), rounds=2,
        train_warmup=1, compiler_options=train_step.QUICK_COMPILER_OPTIONS,
        ghost=("cnn", 2, 0), ghost_methods=("non-private", "ghost"),
        estimate_s={g: 1.0 for g in GROUPS}),
}


class Budget:
  """Seconds left of an overall budget, counted from its creation."""

  def __init__(self, seconds: float):
    self.seconds, self.start = seconds, time.perf_counter()

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def left(self) -> float:
    return self.seconds - self.elapsed()

  def allows(self, need_s: float) -> bool:
    return self.left() >= need_s


def device_kind() -> str:
  """``jax.devices()[0].device_kind`` as a file name, e.g. ``nvidia-h100``."""
  kind = jax.devices()[0].device_kind
  return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-") or "unknown"


def _config(size: Size) -> run.Config:
  return run.Config(trees=(size.tree,), dtypes=("float32",), reps=size.reps,
                    chained_reps=size.chained_reps,
                    compile_reps=size.compile_reps, warmup=size.warmup,
                    torch=False, specs=("global_norm",))


def _tree_groups(size: Size, budget: Budget, log: Callable[[str], None]
                 ) -> tuple[list[dict[str, Any]], list[str]]:
  """The norm, standalone, chained and compile groups on ``size.tree``."""
  cfg = _config(size)
  spec = next(s for s in suite.specs(False) if s.key == "global_norm")
  ctx = suite.make_context(size.tree, "float32")
  base = {"tree": size.tree, "dtype": "float32", "params": ctx.size,
          "leaves": len(jax.tree_util.tree_leaves(ctx.grads)),
          "tree_bytes": ctx.nbytes}
  groups: dict[str, Callable[[], list[dict[str, Any]]]] = {
      "norm": lambda: run._norm(ctx, cfg, lambda: None, base),
      "standalone": lambda: run._standalone(spec, ctx, cfg, lambda: None,
                                            base),
      "chained": lambda: run._chained(spec, ctx, cfg, lambda: None, base),
      "compile": lambda: _compile_rows(spec, ctx, cfg, base),
  }
  rows, skipped = [], []
  for group, fn in groups.items():
    if not budget.allows(size.estimate_s[group]):
      skipped.append(group)
      continue
    log(f"{group} ({budget.elapsed():.0f} s so far)")
    rows += [{"group": group, **r} for r in fn()]
  return rows, skipped


def _compile_rows(spec, ctx, cfg, base) -> list[dict[str, Any]]:
  pair = suite.compile_pair(spec, ctx, cfg.compile_reps)
  assert pair is not None  # clip_by_global_norm has an optax twin.
  return [{**base, "section": "compile", "transform": spec.name,
           "name": f"chain({name}, adamw)", "impl": impl,
           "compile_s": pair[impl], "ratio": pair[impl] / pair["optax"]}
          for impl, name in (("optaxclip", "oc.clip_by_global_norm"),
                             ("optax", "optax.clip_by_global_norm"))]


def _train_rows(size: Size, budget: Budget, log: Callable[[str], None]
                ) -> tuple[list[dict[str, Any]], list[str]]:
  """Each case compiled while the budget allows, then timed interleaved."""
  table = train_step.cases()
  batch = train_step.tokens(size.model)
  per_case = size.estimate_s["train_step"] / len(size.train_cases)
  cases, compile_s, skipped = [], {}, []
  for name in size.train_cases:
    # The timed rounds need about as long as one more compile.
    if not budget.allows(2 * per_case):
      skipped.append(f"train_step {name}")
      continue
    log(f"train_step: compiling {name} ({budget.elapsed():.0f} s so far)")
    impl, opt = table[name]
    start = time.perf_counter()
    cases.append(train_step.make_case(name, impl, opt, size.model, batch, 1,
                                      size.compiler_options))
    compile_s[name] = time.perf_counter() - start
  if len(cases) < 2:  # Nothing to compare with the bare step.
    return [], ["train_step"]
  times = timing.interleave(cases, size.rounds, size.train_warmup)
  bare = timing.median(times[train_step.BARE])
  params = sum(x.size for x in jax.tree.leaves(
      train_step.init_params(size.model)))
  rows = []
  for c in cases:
    t = timing.median(times[c.name])
    rows.append({
        "group": "train_step", "name": c.name, "impl": c.impl,
        "ms": 1e3 * t, "ratio": t / bare,
        "paired_ratio": timing.median([a / b for a, b in zip(
            times[c.name], times[train_step.BARE])]),
        "target": train_step.target(c.name, c.impl),
        "compile_s": compile_s[c.name], "params": params})
  return rows, skipped


def _ghost_rows(size: Size, budget: Budget, log: Callable[[str], None]
                ) -> tuple[list[dict[str, Any]], list[str]]:
  from benchmarks import ghost  # Flax NNX: imported only when needed.

  model, batch, seq = size.ghost
  per_case = size.estimate_s["ghost"] / len(size.ghost_methods)
  rows, skipped = [], []
  for method in size.ghost_methods:
    if not budget.allows(per_case):
      skipped.append(f"ghost {method}")
      continue
    log(f"ghost: compiling {method} ({budget.elapsed():.0f} s so far)")
    mem = ghost.compiled_memory(model, batch, seq, method)
    rows.append({"group": "ghost", "name": method, "model": model,
                 "batch": batch, "seq": seq, **mem})
  plain = next((r for r in rows if r["name"] == "non-private"), None)
  for r in rows:
    r["total_over_plain"] = (r["total_mib"] / plain["total_mib"]
                             if plain else None)
  return rows, skipped


def metadata(argv: list[str], size_name: str, size: Size, budget: Budget
             ) -> dict[str, Any]:
  versions = {"python": platform.python_version(), "jax": jax.__version__,
              "optax": optax.__version__, "optaxclip": oc.__version__}
  try:
    import jaxlib
    versions["jaxlib"] = jaxlib.__version__
  except (ImportError, AttributeError):
    pass
  try:
    import flax
    versions["flax"] = flax.__version__
  except ImportError:
    pass
  dev = jax.devices()[0]
  return {
      "command": ("python -m benchmarks.device " + " ".join(argv)).strip(),
      "date_utc": datetime.datetime.now(datetime.UTC).strftime(
          "%Y-%m-%d %H:%M:%S"),
      "platform": jax.default_backend(), "device_kind": dev.device_kind,
      "device_count": jax.device_count(), "cpu": run._cpu_model(),
      "cpu_count": os.cpu_count(), "versions": versions, "size": size_name,
      "config": {k: v for k, v in dataclasses.asdict(size).items()
                 if k != "estimate_s"},
      "budget_s": budget.seconds}


def _fmt(x: Any, digits: int = 2) -> str:
  if x is None:
    return ""
  if isinstance(x, float):
    return f"{x:.{digits}f}"
  return str(x)


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]],
             skipped: list[str]) -> str:
  m = meta
  lines = [
      f"# Headline benchmarks, {m['device_kind']}", "",
      f"`{m['command']}`, {m['date_utc']} UTC, {m['platform']}"
      f" ({m['device_count']} device(s)); "
      + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
      + f". Size `{m['size']}`: tree `{m['config']['tree']}` (float32),"
      f" {m['elapsed_s']:.0f} s of a {m['budget_s']:.0f} s budget."
      + (f" Peak device memory {m['peak_device_bytes'] / 2**30:.2f} GiB."
         if m.get("peak_device_bytes") else "")]
  if skipped:
    lines += ["", "**Stopped near the time budget; left out:** "
              + ", ".join(skipped) + "."]

  def table(title, header, keys, group, note=""):
    sel = [r for r in rows if r["group"] == group]
    if not sel:
      return
    lines.extend(["", f"## {title}", ""] + ([note, ""] if note else []))
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + " --- |" * len(header))
    for r in sel:
      lines.append("| " + " | ".join(
          f"`{r['name']}`" if k == "name" else _fmt(r.get(k)) for k in keys)
          + " |")

  table("Global norm alone", ["case", "ms", "GB/s", "fraction of bound",
                              "ours / this"],
        ["name", "time_ms", "gbps", "frac_bound", "ours_over_this"], "norm",
        "One read of the tree; the bound reads and writes it.")
  table("clip_by_global_norm, standalone", ["case", "ms", "GB/s",
                                            "fraction of bound",
                                            "ours / this"],
        ["name", "time_ms", "gbps", "frac_bound", "ours_over_this"],
        "standalone", "Three passes: read for the norm, read and write to"
        " scale.")
  table("Chained with AdamW", ["update", "ms", "AdamW ms", "/ AdamW",
                               "bytes allow"],
        ["name", "time_ms", "adamw_ms", "ratio", "bytes_bound_ratio"],
        "chained")
  table("Compile time of the chained update", ["update", "s", "/ optax"],
        ["name", "compile_s", "ratio"], "compile")
  table("Whole train step", ["step", "ms", "/ bare", "paired", "target",
                             "compile s"],
        ["name", "ms", "ratio", "paired_ratio", "target", "compile_s"],
        "train_step",
        "Decoder-only transformer LM, float32: " + ", ".join(
            f"{k} {v}" for k, v in m["config"]["model"].items())
        + f"; median over {m['config']['rounds']} interleaved rounds;"
        " parameters and optimizer state donated.")
  table("Ghost clipping, compiled memory", ["method", "temp MiB",
                                            "total MiB", "/ plain",
                                            "compile s"],
        ["name", "temp_mib", "total_mib", "total_over_plain", "compile_s"],
        "ghost", "Model `{}`, batch {}".format(*m["config"]["ghost"])
        + (f", sequence {m['config']['ghost'][2]}."
           if m["config"]["ghost"][2] else "."))
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[str]:
  argv = sys.argv[1:] if argv is None else list(argv)
  p = argparse.ArgumentParser(prog="python -m benchmarks.device",
                              description=__doc__.splitlines()[0])
  p.add_argument("--tiny", action="store_true",
                 help="tiny sizes, for checking the harness on a CPU")
  p.add_argument("--budget-s", type=float, default=BUDGET_S,
                 help="overall seconds from the start; a group or case starts"
                 " only while its estimate is left (default %(default)s)")
  p.add_argument("--out", default=RESULTS, help="output folder")
  p.add_argument("--name", help="file stem (default device-<device kind>)")
  p.add_argument("--quiet", action="store_true", help="no progress lines")
  args = p.parse_args(argv)
  size_name = "tiny" if args.tiny else "accelerator"
  size = SIZES[size_name]
  budget = Budget(args.budget_s)
  log = (lambda s: None) if args.quiet else run.log_stderr
  jax.jit(lambda x: x + 1)(jnp.zeros(()))  # The backend's start-up.
  rows, skipped = _tree_groups(size, budget, log)
  for group, fn in (("train_step", _train_rows), ("ghost", _ghost_rows)):
    if not budget.allows(size.estimate_s[group]):
      skipped.append(group)
      continue
    more, left_out = fn(size, budget, log)
    rows += more
    skipped += left_out
  meta = metadata(argv, size_name, size, budget)
  meta["elapsed_s"] = budget.elapsed()
  meta["peak_device_bytes"] = timing.peak_device_bytes()
  meta["skipped"] = skipped
  md = markdown(meta, rows, skipped)
  print(md)
  stem = args.name or f"device-{device_kind()}" + ("-tiny" if args.tiny
                                                    else "")
  paths = run.write_results(args.out, stem, {"meta": meta, "rows": rows}, md)
  log(f"Wrote {', '.join(paths)}" + (
      f"; left out near the budget: {', '.join(skipped)}" if skipped else ""))
  return paths


if __name__ == "__main__":
  main()
