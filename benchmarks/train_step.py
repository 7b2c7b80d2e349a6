"""``python -m benchmarks.train_step``: each clipper's cost in a whole train step.

Times one jitted train step of a small decoder-only transformer language model
(plain JAX, float32, generated integer tokens): forward, backward
(``jax.value_and_grad``), the clipper chained before ``optax.adamw(1e-3)`` (or
the guard wrapped around it), and ``optax.apply_updates``, with parameters and
optimizer state donated. Every case is compiled first; then all cases run
interleaved, each round timing one step (or ``--steps`` consecutive steps) of
every case, and each time is the median over the rounds; the CPU time of the
process is recorded beside the wall time. Also counts the kernels (top-level
operations) and whole-buffer copies XLA puts in each compiled step. Writes
``benchmarks/results/train-step-<platform>-<device>.{md,json}``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import math
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaxclip as oc
from benchmarks import run, timing, trees

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TARGET = 1.03  # Each optaxclip clipper: at most 3% over the bare step.
GUARD_TARGET = 1.05  # oc.skip_step around AdamW: at most 5%.
BARE = "adamw"
# --quick checks the harness rather than measuring: it compiles without XLA's
# backend optimizations, in about half the time.
QUICK_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Model:
  """A GPT-style decoder: pre-norm blocks, learned positions, GELU MLP."""

  vocab: int
  d_model: int
  layers: int
  heads: int
  seq: int
  batch: int

  @property
  def ff(self) -> int:
    return 4 * self.d_model


# The default step takes about 210 to 300 ms on a shared 2-core AMD EPYC.
MODELS = {
    "default": Model(vocab=256, d_model=256, layers=4, heads=4, seq=128,
                     batch=4),
    "quick": Model(vocab=64, d_model=32, layers=1, heads=2, seq=16, batch=2),
}


def init_params(model: Model, seed: int = 0) -> Params:
  """Initial parameters as host arrays (fresh device buffers for each case).

  Kernels and embeddings are normal with standard deviation 0.02 (the
  output projections of each block scaled down by the depth), biases zero,
  norm scales one.
  """
  d, f = model.d_model, model.ff
  rng = np.random.default_rng(seed)

  def normal(*shape, scale=1.0):
    return (0.02 * scale * rng.standard_normal(shape)).astype(np.float32)

  def dense(a, b, scale=1.0):
    return {"kernel": normal(a, b, scale=scale),
            "bias": np.zeros((b,), np.float32)}

  def norm():
    return {"scale": np.ones((d,), np.float32),
            "bias": np.zeros((d,), np.float32)}

  out_scale = 1.0 / math.sqrt(2 * model.layers)
  params: Params = {
      "embed": normal(model.vocab, d), "pos": normal(model.seq, d),
      "final_norm": norm(), "head": dense(d, model.vocab),
  }
  for i in range(model.layers):
    params[f"block_{i}"] = {
        "norm_1": norm(), "qkv": dense(d, 3 * d),
        "proj": dense(d, d, out_scale), "norm_2": norm(),
        "fc_1": dense(d, f), "fc_2": dense(f, d, out_scale)}
  return params


def _layer_norm(p: Params, x: jax.Array) -> jax.Array:
  mean = jnp.mean(x, -1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), -1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def _dense(p: Params, x: jax.Array) -> jax.Array:
  return x @ p["kernel"] + p["bias"]


def logits(model: Model, params: Params, tokens: jax.Array) -> jax.Array:
  """``tokens``: ``(batch, seq)`` int32 -> ``(batch, seq, vocab)``."""
  b, t = tokens.shape
  h, dh = model.heads, model.d_model // model.heads
  x = params["embed"][tokens] + params["pos"][:t]
  mask = jnp.tril(jnp.ones((t, t), bool))
  for i in range(model.layers):
    p = params[f"block_{i}"]
    q, k, v = jnp.split(_dense(p["qkv"], _layer_norm(p["norm_1"], x)), 3, -1)
    q, k, v = (a.reshape(b, t, h, dh) for a in (q, k, v))
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh)
    s = jnp.where(mask, s, -1e9)
    a = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v)
    x = x + _dense(p["proj"], a.reshape(b, t, model.d_model))
    y = jax.nn.gelu(_dense(p["fc_1"], _layer_norm(p["norm_2"], x)))
    x = x + _dense(p["fc_2"], y)
  return _dense(params["head"], _layer_norm(params["final_norm"], x))


def loss_fn(model: Model, params: Params, batch: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy; ``batch``: ``(batch, seq + 1)`` int32."""
  out = logits(model, params, batch[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(
      out, batch[:, 1:]).mean()


def train_step_fn(model: Model, opt: optax.GradientTransformation) -> Callable:
  """``(params, opt_state, batch) -> (params, opt_state, loss)``."""
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(
        lambda p: loss_fn(model, p, batch))(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def adamw() -> optax.GradientTransformation:
  return optax.adamw(1e-3)


def cases() -> dict[str, tuple[str, optax.GradientTransformation]]:
  """Name -> (``"optaxclip"`` or ``"optax"``, optimizer), bare step first."""
  def chain(clipper):
    return optax.chain(clipper, adamw())

  table: dict[str, tuple[str, optax.GradientTransformation]] = {
      BARE: ("optax", adamw()),
      "oc.clip_by_value(1.0)": ("optaxclip", chain(oc.clip_by_value(1.0))),
      "oc.clip_by_norm(1.0)": ("optaxclip", chain(oc.clip_by_norm(1.0))),
      "oc.clip_by_global_norm(1.0)": (
          "optaxclip", chain(oc.clip_by_global_norm(1.0))),
      "oc.adaptive_grad_clip(0.01)": (
          "optaxclip", chain(oc.adaptive_grad_clip(0.01))),
      "oc.clip_by_quantile()": ("optaxclip", chain(oc.clip_by_quantile())),
      "oc.zclip()": ("optaxclip", chain(oc.zclip())),
  }
  table.update({
      "oc.skip_step(adamw)": ("optaxclip", oc.skip_step(adamw())),
      "optax.clip(1.0)": ("optax", chain(optax.clip(1.0))),
      "optax.clip_by_block_rms(1.0)": (
          "optax", chain(optax.clip_by_block_rms(1.0))),
      "optax.clip_by_global_norm(1.0)": (
          "optax", chain(optax.clip_by_global_norm(1.0))),
      "optax.adaptive_grad_clip(0.01)": (
          "optax", chain(optax.adaptive_grad_clip(0.01))),
      "optax.apply_if_finite(adamw, 10**6)": (
          "optax", optax.apply_if_finite(adamw(), 10**6)),
  })
  return table


def target(name: str, impl: str) -> float | None:
  """The largest allowed ratio to the bare step, where there is a target."""
  if impl != "optaxclip":
    return None
  return GUARD_TARGET if name.startswith("oc.skip_step") else TARGET


_NOT_KERNELS = ("parameter", "tuple", "get-tuple-element", "constant",
                "bitcast")


def entry_ops(compiled: Any) -> collections.Counter[str]:
  """Opcodes of the top-level operations of a compiled step.

  Each top-level operation is one kernel (a fusion, a dot, a copy, ...) run
  per step, apart from those in ``_NOT_KERNELS``; copies here are whole-buffer
  copies, unlike copies fused into a kernel.
  """
  text = compiled.as_text()
  entry = text[text.index("\nENTRY "):]
  entry = entry[:entry.index("\n}")]
  return collections.Counter(
      re.findall(r"^\s+(?:ROOT )?\S+ = .*? ([a-z][\w-]*)\(", entry, re.M))


def kernels(ops: collections.Counter[str]) -> int:
  """Kernels run per step, from ``entry_ops``."""
  return sum(n for op, n in ops.items() if op not in _NOT_KERNELS)


def make_case(name: str, impl: str, opt: optax.GradientTransformation,
              model: Model, batch: jax.Array, steps: int,
              compiler_options: dict[str, Any] | None = None) -> timing.Case:
  """A case that runs ``steps`` donated train steps per timed call."""
  host = init_params(model)
  opt_init = jax.jit(opt.init)

  def setup():
    params = jax.tree.map(jnp.asarray, host)  # Fresh buffers, to donate.
    return params, trees.copy_tree(opt_init(params)), batch

  case = timing.jax_case(name, impl, train_step_fn(model, opt), setup,
                         donate=(0, 1), compiler_options=compiler_options)
  one = case.step

  def several(carry):
    for _ in range(steps):
      carry = one(carry)
    return carry

  case.step = several
  return case


def tokens(model: Model, seed: int = 0) -> jax.Array:
  """Uniform random token ids, ``(batch, seq + 1)`` int32."""
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, model.vocab, (model.batch, model.seq + 1),
                                  dtype=np.int32))


def main(argv=None) -> list[str]:
  argv = sys.argv[1:] if argv is None else list(argv)
  p = argparse.ArgumentParser(prog="python -m benchmarks.train_step",
                              description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true",
                 help="check the harness: tiny model compiled without backend"
                 " optimizations, 2 rounds, 1 warm-up round")
  p.add_argument("--rounds", type=int, help="timed rounds (default 45)")
  p.add_argument("--steps", type=int,
                 help="consecutive steps of each case per round (default 1)")
  p.add_argument("--warmup", type=int, help="untimed rounds (default 3)")
  p.add_argument("--only", action="append", metavar="CASE",
                 help="time only this case (repeatable; the bare step is"
                 " always timed): " + ", ".join(cases()))
  p.add_argument("--out", default=RESULTS)
  p.add_argument("--name", help="file stem (default train-step-<machine>)")
  args = p.parse_args(argv)
  quick = args.quick
  rounds = args.rounds or (2 if quick else 45)
  steps = args.steps or 1
  warmup = args.warmup if args.warmup is not None else (1 if quick else 3)
  model = MODELS["quick" if quick else "default"]
  batch = tokens(model)

  table = cases()
  if args.only:
    unknown = sorted(set(args.only) - set(table))
    if unknown:
      p.error(f"unknown cases {unknown}; known: {list(table)}")
    table = {k: v for k, v in table.items() if k == BARE or k in args.only}
  t0 = time.perf_counter()
  options = QUICK_COMPILER_OPTIONS if quick else None
  timed, case_compile_s = [], {}
  jax.jit(lambda x: x + 1)(jnp.zeros(()))  # The backend's start-up, untimed.
  for name, (impl, opt) in table.items():
    run.log_stderr(f"compiling {name}")
    start = time.perf_counter()
    timed.append(make_case(name, impl, opt, model, batch, steps, options))
    case_compile_s[name] = time.perf_counter() - start
  compile_s = time.perf_counter() - t0
  done = [0]

  def tick():
    done[0] += 1
    run.log_stderr(f"round {done[0]}/{rounds}")

  run.log_stderr(f"{warmup} warm-up round(s), then {rounds} timed rounds")
  cpu: dict[str, list[float]] = {}
  times = timing.interleave(timed, reps=rounds, warmup=warmup, tick=tick,
                            cpu=cpu)
  med = {name: timing.median(t) / steps for name, t in times.items()}
  cpu_med = {name: timing.median(t) / steps for name, t in cpu.items()}
  params = init_params(model)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  n_leaves = len(jax.tree.leaves(params))
  rows = []
  for case in timed:
    ts = sorted(t / steps for t in times[case.name])
    ops = entry_ops(case.compiled)
    limit = target(case.name, case.impl)
    ratio = med[case.name] / med[BARE]
    paired = timing.median([a / b for a, b in zip(times[case.name],
                                                   times[BARE])])
    rows.append({
        "name": case.name, "impl": case.impl, "ms": 1e3 * med[case.name],
        "ms_min": 1e3 * ts[0], "ms_max": 1e3 * ts[-1], "ratio": ratio,
        "target": limit, "met": None if limit is None else ratio <= limit,
        "paired_ratio": paired, "cpu_ms": 1e3 * cpu_med[case.name],
        "cpu_ratio": cpu_med[case.name] / cpu_med[BARE],
        "kernels": kernels(ops), "copies": ops["copy"],
        "temp_mib": (timing.temp_bytes(case.compiled) or 0) / 2**20,
        "compile_s": case_compile_s[case.name],
        # The clipper's share of the step's compile time.
        "compile_share": 1 - case_compile_s[BARE] / case_compile_s[case.name]})

  backend, device = run.machine_name()
  meta = {
      "command": ("python -m benchmarks.train_step " + " ".join(argv)).strip(),
      "date_utc": datetime.datetime.now(datetime.UTC).strftime(
          "%Y-%m-%d %H:%M:%S"),
      "platform": backend, "device": device,
      "device_kind": jax.devices()[0].device_kind,
      "cpu": run._cpu_model(), "cpu_count": os.cpu_count(),
      "versions": {"jax": jax.__version__, "optax": optax.__version__,
                   "optaxclip": oc.__version__},
      "model": dataclasses.asdict(model), "params": n_params,
      "leaves": n_leaves, "rounds": rounds, "steps_per_round": steps,
      "warmup": warmup, "compile_s": compile_s,
      "compiler_options": options,
  }
  m = model
  lines = [
      f"# The whole train step, {meta['device']}",
      "",
      f"`{meta['command']}`, {meta['date_utc']} UTC; jax {jax.__version__},"
      f" optax {optax.__version__}. Decoder-only transformer LM, float32:"
      f" vocab {m.vocab}, d_model {m.d_model}, {m.layers} layers, {m.heads}"
      f" heads, sequence {m.seq}, batch {m.batch} ({n_params / 1e6:.2f}M"
      f" parameters, {n_leaves} leaves). Forward, `jax.value_and_grad`,"
      " clipper, `optax.adamw(1e-3)`, `apply_updates`; parameters and"
      f" optimizer state donated. Median over {rounds} interleaved rounds of"
      f" {steps} step(s) per case, after {warmup} warm-up round(s).",
      "",
      "*ms*: median wall time of a step; */ bare*: that over the bare step's"
      " (`adamw`), the ratio the target applies to; *paired*: median over the"
      " rounds of the step's time over the bare step's in the same round;"
      " *CPU*: median CPU time of the process (all threads) per step over the"
      " bare step's, which does not grow while other processes hold the"
      " cores; *kernels*, *copies*: top-level operations and whole-buffer"
      " copies in the compiled step; *compile s*: seconds to compile the step"
      " (each case once, in turn); *share*: the part of it the clipper adds,"
      " `1 - bare / this` (target <= 5%).",
      "",
      "| step | ms | / bare | target | met | paired | CPU | kernels |"
      " copies | compile s | share |",
      "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  for r in rows:
    tgt = "" if r["target"] is None else f"<= {r['target']:.2f}"
    met = "" if r["met"] is None else ("met" if r["met"] else "missed")
    lines.append(
        f"| `{r['name']}` | {r['ms']:.1f} | {r['ratio']:.3f} | {tgt} | {met}"
        f" | {r['paired_ratio']:.3f} | {r['cpu_ratio']:.3f} | {r['kernels']}"
        f" | {r['copies']} | {r['compile_s']:.2f} |"
        f" {100 * r['compile_share']:.1f}% |")
  if quick:
    lines += ["", "Quick mode: a tiny model compiled without XLA's backend"
              " optimizations, for checking the harness; its times say"
              " nothing about the clippers."]
  md = "\n".join(lines)
  print(md)
  stem = args.name or "train-step-" + "-".join(
      (backend, device) + (("quick",) if quick else ()))
  return run.write_results(args.out, stem, {"meta": meta, "rows": rows}, md)


if __name__ == "__main__":
  main()
