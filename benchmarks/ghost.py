"""``python -m benchmarks.ghost [--quick]``: ghost clipping, memory and time.

Compares, side by side in one run, three gradient computations of a Flax NNX
model, each jitted:

- ``non-private``: ``jax.grad`` of the batch's mean loss (the plain step);
- ``ghost``: ``oc.clipped_grad(..., method="ghost")``;
- ``ghost-mb64``: the same in microbatches of 64 examples
  (``microbatch_size=64``), which bounds memory by the microbatch;
- ``vmap``: ``oc.clipped_grad(..., method="vmap")`` (per-example gradients);
- ``jax-privacy``: ``jax_privacy.clipping.clipped_grad`` with microbatches
  of 64 (per-example gradients of 64 examples at a time), when
  ``jax-privacy`` is installed (otherwise the table says so).

With ``--suite frameworks``: the non-private step and ``ghost`` (compiled
memory and compile time) on one model of each framework: NNX attention
transformers (a list of blocks; stacked by ``nnx.vmap`` and run by
``nnx.scan``; the same under ``nnx.remat``), a linen ViT (``nn.scan`` over
``nn.remat``'d blocks), a linen language model with a tied output and an
Equinox transformer (needs ``equinox``).

The main suite's two models: a small transformer language model (token embedding, causal
self-attention and MLP blocks of ``nnx.Linear``, ``nnx.LayerNorm``; about 10M
parameters at the default size) and a CNN (three ``nnx.Conv``, one
``nnx.Linear``). Memory is XLA's compiled memory analysis (the executable's
temporary buffers plus its arguments and outputs), measured in this process
for every case, and the peak resident set size (``ru_maxrss``) of a fresh
subprocess that compiles and runs one case, for the timed cases (``VmHWM``). Times are
medians over repetitions of the whole step in that subprocess. Writes
``benchmarks/results/ghost-<platform>-<device>.{json,md}`` and
``docs/figures/ghost_scaling.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optaxclip as oc
from benchmarks import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
FIGURE = os.path.join(ROOT, "docs", "figures", "ghost_scaling.png")
METHODS = ("non-private", "ghost", "ghost-mb64", "vmap", "jax-privacy")
MICROBATCH = 64
MiB = 2**20


class Block(nnx.Module):

  def __init__(self, dim: int, heads: int, rngs: nnx.Rngs):
    self.heads = heads
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
    self.proj = nnx.Linear(dim, dim, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.up = nnx.Linear(dim, 4 * dim, rngs=rngs)
    self.down = nnx.Linear(4 * dim, dim, rngs=rngs)

  def __call__(self, x):
    *lead, seq, dim = x.shape
    q, k, v = jnp.split(self.qkv(self.norm1(x)), 3, axis=-1)
    split = lambda t: t.reshape(*lead, seq, self.heads, -1)  # noqa: E731
    mask = jnp.tril(jnp.ones((seq, seq), bool))
    a = jax.nn.dot_product_attention(split(q), split(k), split(v), mask=mask)
    x = x + self.proj(a.reshape(*lead, seq, dim))
    return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class Transformer(nnx.Module):

  def __init__(self, rngs: nnx.Rngs, vocab: int = 256, dim: int = 384,
               depth: int = 5, heads: int = 6, seq: int = 128):
    self.embed = nnx.Embed(vocab, dim, rngs=rngs)
    self.pos = nnx.Embed(seq, dim, rngs=rngs)
    self.blocks = nnx.List([Block(dim, heads, rngs) for _ in range(depth)])
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, vocab, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.pos(jnp.arange(tokens.shape[-1]))
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x))


class MHABlock(nnx.Module):

  def __init__(self, dim: int, heads: int, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.up = nnx.Linear(dim, 4 * dim, rngs=rngs)
    self.down = nnx.Linear(4 * dim, dim, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.norm1(x), mask=nnx.make_causal_mask(x[..., 0]))
    return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class MHATransformer(nnx.Module):
  """Blocks of ``nnx.MultiHeadAttention`` as a list (``stacked=False``) or
  stacked by ``nnx.vmap`` and run by ``nnx.scan`` (``stacked=True``)."""

  def __init__(self, rngs: nnx.Rngs, depth: int, stacked: bool,
               vocab: int = 256, dim: int = 256, heads: int = 4,
               seq: int = 16, remat: bool = False):
    self.embed = nnx.Embed(vocab, dim, rngs=rngs)
    self.pos = nnx.Embed(seq, dim, rngs=rngs)
    self.stacked, self.remat = stacked, remat
    if stacked:
      @nnx.split_rngs(splits=depth)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def create(rngs):
        return MHABlock(dim, heads, rngs)
      self.blocks = create(rngs)
    else:
      self.blocks = nnx.List([MHABlock(dim, heads, rngs)
                              for _ in range(depth)])
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, vocab, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.pos(jnp.arange(tokens.shape[-1]))
    if self.stacked:
      step = lambda x, block: block(x)  # noqa: E731
      if self.remat:
        step = nnx.remat(step,
                         policy=jax.checkpoint_policies.nothing_saveable)
      x = nnx.scan(step, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(
          x, self.blocks)
    else:
      for block in self.blocks:
        x = block(x)
    return self.head(self.norm(x))


class CNN(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(3, 32, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(32, 64, (3, 3), strides=2, rngs=rngs)
    self.conv3 = nnx.Conv(64, 64, (3, 3), strides=2, rngs=rngs)
    self.out = nnx.Linear(64, 10, rngs=rngs)

  def __call__(self, x):
    for conv in (self.conv1, self.conv2, self.conv3):
      x = jax.nn.relu(conv(x))
    return self.out(x.mean(axis=(-3, -2)))


def case(model: str, batch: int, seq: int):
  """``(params, loss, x, y)``: ``loss`` is the batch's mean."""
  rng = np.random.default_rng(0)
  if model in FRAMEWORK_MODELS:
    return framework_case(model, batch, seq)
  if model.startswith("mha"):
    # "mha3", "mha3-stacked", "mha3-remat" (stacked, nnx.remat): 3 blocks.
    depth = int(model[3:].split("-")[0])
    net = MHATransformer(nnx.Rngs(0), depth, not model[3:].isdigit(),
                         seq=seq, remat=model.endswith("-remat"))
    x = jnp.asarray(rng.integers(0, 256, (batch, seq)), jnp.int32)
    y = jnp.asarray(rng.integers(0, 256, (batch, seq)), jnp.int32)
  elif model == "transformer":
    net = Transformer(nnx.Rngs(0), seq=seq)
    x = jnp.asarray(rng.integers(0, 256, (batch, seq)), jnp.int32)
    y = jnp.asarray(rng.integers(0, 256, (batch, seq)), jnp.int32)
  else:
    net = CNN(nnx.Rngs(0))
    x = jnp.asarray(rng.standard_normal((batch, 32, 32, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, (batch,)), jnp.int32)
  graphdef, params = nnx.split(net, nnx.Param)

  def loss(p, x, y):
    logits = nnx.merge(graphdef, p)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return params, loss, x, y


FRAMEWORK_MODELS = ("linen-vit", "linen-lm", "equinox")
WIDTH = 128


def framework_case(model: str, batch: int, seq: int):
  """A linen ViT (``nn.scan`` over ``nn.remat``'d blocks, big_vision's
  layout), a linen language model (embedding tied to the output, nanodo's
  layout) or an Equinox transformer, each of 3 blocks of width
  ``WIDTH``: ``(params, loss, x, y)``."""
  rng = np.random.default_rng(0)
  tokens = lambda: jnp.asarray(rng.integers(0, 256, (batch, seq)),  # noqa: E731
                               jnp.int32)
  if model == "equinox":
    import equinox as eqx
    net = _equinox_lm(jax.random.key(0), seq)
    params, static = eqx.partition(net, eqx.is_array)

    def eqx_loss(p, x, y):
      logits = jax.vmap(eqx.combine(p, static))(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return params, eqx_loss, tokens(), tokens()
  if model == "linen-vit":
    net = _linen_vit()
    side = int(round(seq ** 0.5)) * 4  # seq patches of 4x4 pixels.
    x = jnp.asarray(rng.standard_normal((batch, side, side, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, (batch,)), jnp.int32)
  else:
    net = _linen_lm(seq)
    x, y = tokens(), tokens()
  params = net.init(jax.random.key(0), x[:1])["params"]

  def linen_loss(p, x, y):
    logits = net.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return params, linen_loss, x, y


def _linen_vit(depth: int = 3, heads: int = 4):
  import flax.linen as nn

  class Block(nn.Module):

    @nn.compact
    def __call__(self, x, _):
      y = nn.LayerNorm()(x)
      x = x + nn.MultiHeadDotProductAttention(num_heads=heads)(y, y)
      y = nn.Dense(4 * WIDTH)(nn.LayerNorm()(x))
      return x + nn.Dense(WIDTH)(nn.gelu(y)), None

  class ViT(nn.Module):

    @nn.compact
    def __call__(self, images):
      x = nn.Conv(WIDTH, (4, 4), strides=4, padding="VALID")(images)
      x = x.reshape(x.shape[0], -1, WIDTH)
      x = x + self.param("pos", nn.initializers.normal(0.02),
                         (1, x.shape[1], WIDTH))
      blocks = nn.scan(nn.remat(Block, prevent_cse=False),
                       variable_axes={"params": 0},
                       split_rngs={"params": True}, length=depth)
      x, _ = blocks(name="blocks")(x, None)
      return nn.Dense(10)(nn.LayerNorm()(x).mean(axis=1))

  return ViT()


def _linen_lm(seq: int, depth: int = 3, heads: int = 4):
  import flax.linen as nn

  class Block(nn.Module):

    @nn.compact
    def __call__(self, x):
      mask = nn.make_causal_mask(jnp.ones(x.shape[:-1]))
      y = nn.RMSNorm()(x)
      x = x + nn.SelfAttention(num_heads=heads)(y, mask=mask)
      y = nn.Dense(4 * WIDTH)(nn.RMSNorm()(x))
      return x + nn.Dense(WIDTH)(nn.gelu(y))

  class LM(nn.Module):

    @nn.compact
    def __call__(self, tokens):
      embed = nn.Embed(256, WIDTH)
      pos = self.param("pos", nn.initializers.normal(0.02), (seq, WIDTH))
      x = embed(tokens) + pos[:tokens.shape[-1]]
      for _ in range(depth):
        x = Block()(x)
      return embed.attend(nn.LayerNorm()(x))

  return LM()


def _equinox_lm(key, seq: int, depth: int = 3, heads: int = 4):
  import equinox as eqx

  class Block(eqx.Module):
    norm1: Any
    attn: Any
    norm2: Any
    up: Any
    down: Any

    def __init__(self, key):
      k = jax.random.split(key, 3)
      self.norm1 = eqx.nn.LayerNorm(WIDTH)
      self.attn = eqx.nn.MultiheadAttention(heads, WIDTH, key=k[0])
      self.norm2 = eqx.nn.LayerNorm(WIDTH)
      self.up = eqx.nn.Linear(WIDTH, 4 * WIDTH, key=k[1])
      self.down = eqx.nn.Linear(4 * WIDTH, WIDTH, key=k[2])

    def __call__(self, x):
      y = jax.vmap(self.norm1)(x)
      causal = jnp.tril(jnp.ones((x.shape[0],) * 2, bool))
      x = x + self.attn(y, y, y, mask=causal)
      y = jax.vmap(self.up)(jax.vmap(self.norm2)(x))
      return x + jax.vmap(self.down)(jax.nn.gelu(y))

  class LM(eqx.Module):
    embed: Any
    blocks: list
    head: Any

    def __init__(self, key):
      k = jax.random.split(key, depth + 2)
      self.embed = eqx.nn.Embedding(256, WIDTH, key=k[0])
      self.blocks = [Block(b) for b in k[1:-1]]
      self.head = eqx.nn.Linear(WIDTH, 256, key=k[-1])

    def __call__(self, tokens):
      x = jax.vmap(self.embed)(tokens)
      for block in self.blocks:
        x = block(x)
      return jax.vmap(self.head)(x)

  return LM(key)


def step(method: str, loss, batch: int):
  """The jitted gradient computation of ``method``; microbatches of
  ``MICROBATCH`` examples, or the whole batch where it is smaller."""
  microbatch = min(MICROBATCH, batch)
  if method == "non-private":
    return jax.jit(jax.grad(loss))
  if method == "jax-privacy":
    from jax_privacy import clipping
    return jax.jit(clipping.clipped_grad(loss, l2_clip_norm=1.0,
                                         batch_argnums=(1, 2),
                                         microbatch_size=microbatch))
  if method == "ghost-mb64":
    grad_fn = oc.clipped_grad(loss, clip=1.0, batch_argnums=(1, 2),
                              method="ghost", microbatch_size=microbatch)
  else:
    grad_fn = oc.clipped_grad(loss, clip=1.0, batch_argnums=(1, 2),
                              method=method)
  # The gradients only, as jax-privacy's (the PerExampleInfo dropped).
  return jax.jit(lambda p, x, y: grad_fn(p, x, y)[0])


def compiled_memory(model: str, batch: int, seq: int, method: str
                    ) -> dict[str, Any]:
  """Compiles one case; XLA's memory analysis and the compile time."""
  params, loss, x, y = case(model, batch, seq)
  start = time.perf_counter()
  compiled = step(method, loss, batch).lower(params, x, y).compile()
  mem = compiled.memory_analysis()
  return {"compile_s": time.perf_counter() - start,
          "temp_mib": mem.temp_size_in_bytes / MiB,
          "total_mib": (mem.temp_size_in_bytes + mem.argument_size_in_bytes
                        + mem.output_size_in_bytes) / MiB,
          "params": int(sum(p.size for p in jax.tree.leaves(params)))}


def timed(model: str, batch: int, seq: int, method: str, reps: int
          ) -> dict[str, Any]:
  """Runs in a fresh process: median step time and the peak RSS."""
  params, loss, x, y = case(model, batch, seq)
  fn = step(method, loss, batch)
  jax.block_until_ready(fn(params, x, y))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(params, x, y))
    times.append(time.perf_counter() - start)
  return {"ms": 1e3 * statistics.median(times), "rss_mib": peak_rss() / MiB}


def peak_rss() -> float:
  """This process's peak resident set size in bytes.

  ``VmHWM`` from ``/proc/self/status`` where it exists (Linux): unlike
  ``ru_maxrss``, it starts afresh at ``exec``, so a subprocess does not
  inherit its parent's peak.
  """
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return float(line.split()[1]) * 1024
  except OSError:
    pass
  return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def in_subprocess(args: dict[str, Any]) -> dict[str, Any]:
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  out = subprocess.run(
      [sys.executable, "-m", "benchmarks.ghost", "--worker", json.dumps(args)],
      cwd=ROOT, env=env, capture_output=True, text=True, check=False)
  if out.returncode:
    return {"error": out.stderr.strip().splitlines()[-1][:200]}
  return json.loads(out.stdout.strip().splitlines()[-1])


def plan(quick: bool, suite: str = "main"
         ) -> dict[str, list[tuple[str, int, int]]]:
  """``{"memory": cases, "timed": cases}``; a case is (model, batch, seq).

  The ``attention`` suite: transformers of ``nnx.MultiHeadAttention``
  blocks (width 256, 4 heads, sequence 16), as a list of 3 blocks and
  stacked (``nnx.vmap``, ``nnx.scan``) with 3, 6 and 12 blocks.
  """
  if suite == "frameworks":
    models = ("mha3", "mha3-stacked", "mha3-remat", *FRAMEWORK_MODELS)
    return {"memory": [(m, 8 if quick else 32, 16 if quick else 64)
                       for m in models], "timed": []}
  if suite == "attention":
    depths = (3,) if quick else (3, 6, 12)
    memory = [("mha3", 64, 16)] + [(f"mha{d}-stacked", 64, 16)
                                   for d in depths]
    return {"memory": memory,
            "timed": [] if quick else [("mha3", 64, 16),
                                       ("mha3-stacked", 64, 16)]}
  if quick:
    return {"memory": [("transformer", 8, 32), ("transformer", 16, 32),
                       ("cnn", 16, 0)],
            "timed": [("cnn", 16, 0)]}
  return {"memory": [("transformer", b, 128) for b in (64, 256, 1024)]
                    + [("transformer", 256, s) for s in (32, 64)]
                    + [("cnn", b, 0) for b in (256, 1024)],
          "timed": [("cnn", 256, 0), ("cnn", 1024, 0), ("transformer", 8, 128),
                    ("transformer", 256, 128)]}


def available(method: str) -> bool:
  if method != "jax-privacy":
    return True
  try:
    import jax_privacy  # noqa: F401
  except ImportError:
    return False
  return True


def main(argv: list[str] | None = None) -> list[str]:
  argv = sys.argv[1:] if argv is None else argv
  p = argparse.ArgumentParser(prog="python -m benchmarks.ghost",
                              description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="a smoke test")
  p.add_argument("--suite", choices=("main", "attention", "frameworks"),
                 default="main",
                 help="the models: the main transformer and CNN, or the"
                 " nnx.MultiHeadAttention transformers (list and stacked), or"
                 " one model of each framework (NNX, also under nnx.remat;"
                 " linen; Equinox) against the non-private step")
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--out", default=RESULTS)
  p.add_argument("--figure", default=FIGURE)
  p.add_argument("--worker", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.worker:
    job = json.loads(args.worker)
    print(json.dumps(timed(**job)))
    return []
  kept = {"main": METHODS, "attention": ("non-private", "ghost", "vmap"),
          "frameworks": ("non-private", "ghost")}[args.suite]
  methods = [m for m in METHODS if available(m) and m in kept]
  rows = []
  todo = plan(args.quick, args.suite)
  for model, batch, seq in todo["memory"]:
    for method in methods:
      row = {"model": model, "batch": batch, "seq": seq, "method": method}
      row |= compiled_memory(model, batch, seq, method)
      rows.append(row)
      print(f"memory {model} batch {batch} seq {seq} {method}:"
            f" {row['total_mib']:.1f} MiB", flush=True)
  for model, batch, seq in todo["timed"]:
    for method in methods:
      row = {"model": model, "batch": batch, "seq": seq, "method": method}
      row |= in_subprocess(dict(model=model, batch=batch, seq=seq,
                                method=method,
                                reps=2 if args.quick else args.reps))
      row["timed"] = True
      rows.append(row)
      print(f"timed {model} batch {batch} seq {seq} {method}: {row}",
            flush=True)
  backend, device = run.machine_name()
  versions = {"python": platform.python_version(), "jax": jax.__version__,
              "flax": _version("flax"), "optaxclip": oc.__version__,
              "jax_privacy": _version("jax_privacy")}
  meta = {"command": " ".join(["python -m benchmarks.ghost", *argv]),
          "date": datetime.datetime.now(datetime.UTC).strftime(
              "%Y-%m-%d %H:%M:%S UTC"),
          "platform": backend, "device": device, "cpus": os.cpu_count(),
          "reps": args.reps, "versions": versions}
  suite = "" if args.suite == "main" else f"-{args.suite}"
  name = f"ghost{suite}-{backend}-{device}" + ("-quick" if args.quick else "")
  os.makedirs(args.out, exist_ok=True)
  stem = os.path.join(args.out, name)
  with open(stem + ".json", "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  text = markdown(rows, meta, methods)
  with open(stem + ".md", "w") as f:
    f.write(text)
  print(text)
  if args.suite != "main":
    return [stem + ".json", stem + ".md"]
  plot(rows, args.figure)
  return [stem + ".json", stem + ".md", args.figure]


def _version(module: str) -> str:
  try:
    return __import__(module).__version__
  except (ImportError, AttributeError):
    return "not installed"


def _ratio(a, b):
  return "-" if a is None or b is None else f"{a / b:.2f}x"


def markdown(rows, meta, methods) -> str:
  base = {(r["model"], r["batch"], r["seq"], r.get("timed", False)): r
          for r in rows if r["method"] == "non-private"}
  out = [f"# Ghost clipping: `{meta['command']}`", "",
         f"{meta['date']}, {meta['platform']} ({meta['device']},"
         f" {meta['cpus']} CPUs), "
         + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
         "", "Ratios are to the non-private `jax.grad` step of the same case"
         " in this run. Compiled memory: XLA's `memory_analysis()` of the"
         " jitted step, temporaries plus arguments and outputs.", ""]
  if "jax-privacy" not in methods and available("jax-privacy"):
    out += ["Methods: " + ", ".join(methods) + ".", ""]
  elif "jax-privacy" not in methods:
    out += ["jax-privacy is not installed: its column is absent.", ""]
  out += ["## Compiled memory", "",
          "| model | params | batch | seq | method | MiB | vs non-private |"
          " compile s | vs non-private |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if r.get("timed"):
      continue
    b = base[(r["model"], r["batch"], r["seq"], False)]
    out.append(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['batch']} |"
               f" {r['seq'] or '-'} | {r['method']} | {r['total_mib']:.1f} |"
               f" {_ratio(r['total_mib'], b['total_mib'])} |"
               f" {r['compile_s']:.1f} |"
               f" {_ratio(r['compile_s'], b['compile_s'])} |")
  out += ["", "## Time and peak RSS (fresh process per row)", "",
          "| model | batch | seq | method | ms (median) | vs non-private |"
          " peak RSS MiB | vs non-private |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if not r.get("timed"):
      continue
    b = base[(r["model"], r["batch"], r["seq"], True)]
    if "error" in r:
      out.append(f"| {r['model']} | {r['batch']} | {r['seq'] or '-'} |"
                 f" {r['method']} | failed: {r['error']} | | | |")
      continue
    out.append(f"| {r['model']} | {r['batch']} | {r['seq'] or '-'} |"
               f" {r['method']} | {r['ms']:.1f} | {_ratio(r['ms'], b.get('ms'))}"
               f" | {r['rss_mib']:.0f} | {_ratio(r['rss_mib'], b.get('rss_mib'))}"
               " |")
  return "\n".join(out) + "\n"


def plot(rows, path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  mem = [r for r in rows if not r.get("timed") and r["model"] == "transformer"]
  seqs = sorted({r["seq"] for r in mem})
  batches = sorted({r["batch"] for r in mem})
  seq_main = max(seqs, key=lambda s: sum(r["seq"] == s for r in mem))
  batch_main = max(batches, key=lambda b: sum(r["batch"] == b for r in mem))
  for method in METHODS:
    by_batch = sorted((r["batch"], r["total_mib"]) for r in mem
                      if r["method"] == method and r["seq"] == seq_main)
    by_seq = sorted((r["seq"], r["total_mib"]) for r in mem
                    if r["method"] == method and r["batch"] == batch_main)
    if by_batch:
      axes[0].plot(*zip(*by_batch), "o-", label=method)
    if by_seq:
      axes[1].plot(*zip(*by_seq), "o-", label=method)
  axes[0].set(xscale="log", yscale="log", xlabel="batch size",
              ylabel="compiled memory (MiB)",
              title=f"transformer, seq {seq_main}")
  axes[1].set(xscale="log", yscale="log", xlabel="sequence length",
              ylabel="compiled memory (MiB)",
              title=f"transformer, batch {batch_main}")
  axes[0].set_xticks(sorted({r["batch"] for r in mem if r["seq"] == seq_main}))
  axes[1].set_xticks(sorted({r["seq"] for r in mem
                             if r["batch"] == batch_main}))
  for ax in axes:
    ax.legend(fontsize=8)
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  main()
