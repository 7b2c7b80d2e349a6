"""DP training of a character-level transformer with ghost clipping.

A small Flax NNX transformer language model, in the layout of large ones
(token and position ``nnx.Embed``; blocks of ``nnx.MultiHeadAttention``,
an ``nnx.Linear`` MLP and ``nnx.LayerNorm``, created stacked by
``nnx.vmap`` and run by ``nnx.scan``; 3.2M parameters) learns to predict the next character of
the Python documentation's topic pages (``pydoc_data.topics``, shipped with
Python: no download). It trains with DP-SGD, ``oc.clipped_grad(...,
method="ghost")`` then ``oc.dp_noise`` and Adam, and once without privacy
(``jax.grad``, Adam) on the same batches.

Ghost clipping never forms per-example gradients, so its memory stays near
the non-private step's where ``method="vmap"`` needs ``batch x parameters``
floats. The script shows it at a batch of 4,096 sequences, where the
per-example gradients alone would take 49 GiB: XLA's compiled memory
analysis of the three steps (nothing of that size is allocated), beside the
memory of the training runs' steps.

Run from the repository root::

  python examples/dp_transformer.py          # 11.5 min on 2 busy CPU cores
  python examples/dp_transformer.py --small  # smoke test
"""

from __future__ import annotations

import argparse
import time
from pydoc_data.topics import topics

import _common
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optaxclip as oc

SEQ = 32
DIM = 256
DEPTH = 4
HEADS = 4
BATCH = 32
BIG_BATCH = 4096
MAX_NORM = 1.0
NOISE = 0.5
LEARNING_RATE = 1e-3
GiB = 2**30


class Block(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(DIM, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(HEADS, DIM, decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(DIM, rngs=rngs)
    self.up = nnx.Linear(DIM, 4 * DIM, rngs=rngs)
    self.down = nnx.Linear(4 * DIM, DIM, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.norm1(x), mask=nnx.make_causal_mask(x[..., 0]))
    return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))


class CharLM(nnx.Module):

  def __init__(self, vocab: int, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, DIM, rngs=rngs)
    self.pos = nnx.Embed(SEQ, DIM, rngs=rngs)

    @nnx.split_rngs(splits=DEPTH)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return Block(rngs)

    self.blocks = create(rngs)  # One module, its parameters (DEPTH, ...).
    self.norm = nnx.LayerNorm(DIM, rngs=rngs)
    self.head = nnx.Linear(DIM, vocab, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.pos(jnp.arange(tokens.shape[-1]))
    x = nnx.scan(lambda x, block: block(x), in_axes=(nnx.Carry, 0),
                 out_axes=nnx.Carry)(x, self.blocks)
    return self.head(self.norm(x))


def load_text() -> tuple[np.ndarray, list[str]]:
  text = "".join(topics[k] for k in sorted(topics))
  chars = sorted(set(text))
  table = {c: i for i, c in enumerate(chars)}
  return np.array([table[c] for c in text], np.int32), chars


def batches(data: np.ndarray, batch: int, steps: int, seed: int = 0):
  """``steps`` batches of random windows: inputs and next characters."""
  rng = np.random.default_rng(seed)
  starts = rng.integers(0, len(data) - SEQ - 1, (steps, batch))
  windows = data[starts[..., None] + np.arange(SEQ + 1)]
  return jnp.asarray(windows[..., :-1]), jnp.asarray(windows[..., 1:])


def make_loss(graphdef):
  def loss(params, x, y):
    logits = nnx.merge(graphdef, params)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss


def grad_steps(loss):
  """The three gradient computations: plain, ghost-clipped, vmap-clipped."""
  def clipped(method):
    return oc.clipped_grad(loss, clip=MAX_NORM, batch_argnums=(1, 2),
                           method=method)
  return {"non-private": jax.grad(loss), "ghost": clipped("ghost"),
          "vmap": clipped("vmap")}


def compiled_gib(fn, *args) -> float:
  """XLA's memory analysis of ``jit(fn)``: temporaries, arguments, outputs."""
  mem = jax.jit(fn).lower(*args).compile().memory_analysis()
  return (mem.temp_size_in_bytes + mem.argument_size_in_bytes
          + mem.output_size_in_bytes) / GiB


def train(private: bool, params, loss, xs, ys):
  """Adam on the batches, with DP-SGD (ghost clipping) or without."""
  steps = grad_steps(loss)
  tx = optax.adam(LEARNING_RATE)
  if private:
    tx = optax.chain(oc.dp_noise(NOISE, key=0, batch_size=BATCH), tx)

  @jax.jit
  def step(params, state, x, y):
    value = loss(params, x, y)
    if private:
      grads, info = steps["ghost"](params, x, y)
      updates, state = tx.update(grads, state, params, clip_info=info)
    else:
      updates, state = tx.update(steps["non-private"](params, x, y), state,
                                 params)
    return optax.apply_updates(params, updates), state, value

  state = tx.init(params)
  losses = []
  for x, y in zip(xs, ys):
    params, state, value = step(params, state, x, y)
    losses.append(value)
  return np.asarray(jax.device_get(losses))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true",
                      help="a smoke test: few steps, a smaller big batch")
  args = parser.parse_args()
  steps = 8 if args.small else 100
  big = 256 if args.small else BIG_BATCH
  data, chars = load_text()
  graphdef, params = nnx.split(CharLM(len(chars), nnx.Rngs(0)), nnx.Param)
  loss = make_loss(graphdef)
  count = sum(p.size for p in jax.tree.leaves(params))
  xs, ys = batches(data, BATCH, steps)
  print(f"{len(data):,} characters, {len(chars)} distinct; {count:,}"
        f" parameters; batch {BATCH} x {SEQ} characters, {steps} steps,"
        f" max_norm={MAX_NORM:g}, noise multiplier {NOISE:g}")

  results = {}
  for label, private in (("non-private", False), ("DP-SGD, ghost", True)):
    start = time.perf_counter()
    results[label] = train(private, params, loss, xs, ys)
    results[label + " seconds"] = time.perf_counter() - start
  rows = [[label, float(np.mean(results[label][:5])),
           float(np.mean(results[label][-5:])), results[label + " seconds"]]
          for label in ("non-private", "DP-SGD, ghost")]
  _common.print_table(["run", "first loss", "last loss", "seconds"], rows)

  # Memory: compiled at the training batch and at the big batch.
  print()
  fns = grad_steps(loss)
  rows = []
  for batch in (BATCH, big):
    x, y = jnp.zeros((batch, SEQ), jnp.int32), jnp.zeros((batch, SEQ),
                                                          jnp.int32)
    gib = {name: compiled_gib(fn, params, x, y) for name, fn in fns.items()}
    rows.append([f"batch {batch}", gib["non-private"], gib["ghost"],
                 gib["vmap"], gib["ghost"] / gib["non-private"],
                 batch * count * 4 / GiB])
  _common.print_table(
      ["compiled memory (GiB)", "non-private", "ghost", "vmap",
       "ghost / non-private", "per-example grads alone"], rows)

  plt = _common.plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for label in ("non-private", "DP-SGD, ghost"):
    ax.plot(results[label], label=label, lw=1)
  ax.set(xlabel="step", ylabel="training loss (nats per character)",
         title=f"Character LM on pydoc topics, batch {BATCH}")
  ax.legend()
  _common.save(fig, "dp_transformer")


if __name__ == "__main__":
  main()
