"""Per-layer gradient norms of a scanned transformer, as a heatmap.

A small transformer regresses the targets of scikit-learn's
``make_regression`` (20 features, read as a sequence of 20 tokens; targets
divided by 20) with SGD (learning rate 0.003, momentum 0.9). Its ``DEPTH``
blocks (``nnx.MultiHeadAttention`` and a ReLU MLP, each residual) are made
by ``nnx.vmap`` and run by ``nnx.scan``, as large models are written: each
block parameter is one leaf holding every layer along a leading axis.
``layer_axis`` makes each layer's slice a tensor of its own, so the
heatmap has one row per layer of the scanned model. Two runs share the
initialisation and the batches:

- ``clip_by_global_norm(inf, leaf_norms=True, layer_axis=...)`` never
  clips, but records each layer's gradient norm: the run explodes, and the
  heatmap shows which layers blow up first and when;
- ``clip_by_global_norm(1.0, ...)`` clips, and stays finite.

The per-layer norms are the partial sums the clipper adds up for the global
norm anyway (no extra pass over the gradients); the jitted step reads them
with ``oc.clip_stats(opt_state, scalars=True)``, one key per leaf and layer
(``blocks/attn/query/kernel[3]``), and a layer's row is the norm of all its
leaves together.

Run from the repository root::

  python examples/layer_norms.py             # 60 steps
  python examples/layer_norms.py --steps 20  # smoke test
"""
from __future__ import annotations

import argparse
import math
import re

import _common
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import make_regression

import optaxclip as oc

BATCH = 32
WIDTH = 32
HEADS = 4
DEPTH = 6
TOKENS = 20
SCALE = 20.0  # Targets scaled down: unclipped, the run diverges in ~10 steps.
RUNS = {
    "unclipped": math.inf,  # Records the norms, never clips.
    "clip_by_global_norm(1.0)": 1.0,
}
PREFIX = "clip_by_global_norm/leaf_norms/"
# The layer axis of each leaf: the blocks stack their layers along axis 0
# (nnx.vmap's default); the other leaves are not stacked. A model whose
# parameters carry sharding metadata, stacked by nnx.vmap(...,
# transform_metadata={nnx.PARTITION_NAME: "layers"}), can have this tree
# read off it: oc.layer_axes(model).
LAYER_AXIS = nnx.State({"embed": None, "position": None, "blocks": 0,
                        "head": None})


class Block(nnx.Module):
  """Self-attention and a ReLU MLP, each behind a LayerNorm and added to the
  residual stream (a pre-LN block)."""

  def __init__(self, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(WIDTH, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(HEADS, WIDTH, decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(WIDTH, rngs=rngs)
    self.hidden = nnx.Linear(WIDTH, 2 * WIDTH, rngs=rngs)
    self.out = nnx.Linear(2 * WIDTH, WIDTH, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.out(jax.nn.relu(self.hidden(self.norm2(x))))


class Transformer(nnx.Module):
  """Token embedding, ``DEPTH`` scanned blocks, a mean-pooled linear head."""

  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Linear(1, WIDTH, rngs=rngs)
    self.position = nnx.Param(0.02 * jax.random.normal(rngs.params(),
                                                       (TOKENS, WIDTH)))

    @nnx.vmap(in_axes=0, out_axes=0)
    def blocks(key):
      return Block(nnx.Rngs(key))

    self.blocks = blocks(jax.random.split(rngs.params(), DEPTH))
    self.head = nnx.Linear(WIDTH, 1, rngs=rngs)

  def __call__(self, x):
    h = self.embed(x[..., None]) + self.position[...]

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def through(h, block):
      return block(h)

    return self.head(jnp.mean(through(h, self.blocks), axis=1))[:, 0]


def mse(model, x, y):
  return jnp.mean(jnp.square(model(x) - y))


def run(threshold: float, x: np.ndarray, y: np.ndarray, steps: int
        ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Trains a fresh model; per-step losses and per-layer pre-clip norms."""
  model = Transformer(nnx.Rngs(0))
  tx = optax.chain(oc.clip_by_global_norm(threshold, leaf_norms=True,
                                          layer_axis=LAYER_AXIS),
                   optax.sgd(0.003, momentum=0.9))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  order = np.random.default_rng(1).integers(0, len(x), (steps, BATCH))

  @nnx.jit
  def train(model, optimizer, xb, yb):
    @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0))
    def step(carry, xs, ys):
      model, optimizer = carry
      loss, grads = nnx.value_and_grad(mse)(model, xs, ys)
      optimizer.update(model, grads)
      stats = oc.clip_stats(optimizer.opt_state, scalars=True)
      norms = {k[len(PREFIX):]: v for k, v in stats.items()
               if k.startswith(PREFIX)}
      return (model, optimizer), (loss, norms)

    return step((model, optimizer), xb, yb)[1]

  losses, norms = train(model, optimizer, jnp.asarray(x[order]),
                        jnp.asarray(y[order]))
  return np.asarray(losses), by_layer({k: np.asarray(v)
                                       for k, v in norms.items()})


def by_layer(norms: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """One row per layer: the norm of all leaves of layer ``i`` of the blocks
  (keys ``blocks/...[i]``), and of the embedding and head."""
  rows: dict[str, list[np.ndarray]] = {}
  for key, v in norms.items():
    match = re.fullmatch(r"blocks/.*\[(\d+)\]", key)
    name = f"block {int(match[1])}" if match else key.split("/")[0]
    rows.setdefault(name, []).append(np.square(v.astype(np.float64)))
  return {name: np.sqrt(sum(v)) for name, v in rows.items()}


def layer_order(name: str) -> int:
  """Embedding first, the blocks in order, the head last."""
  if name.startswith("block "):
    return 2 + int(name.split()[1])
  return {"embed": 0, "position": 1}.get(name, 2 + DEPTH)


def plot(results: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]]) -> str:
  plt = _common.plt
  fig, axes = plt.subplots(1, len(results), figsize=(12, 4.2),
                           constrained_layout=True)
  names = sorted(next(iter(results.values()))[1], key=layer_order)
  finite = np.concatenate([
      np.ravel(v) for _, norms in results.values() for v in norms.values()])
  finite = finite[np.isfinite(finite) & (finite > 0)]
  lo, hi = np.log10(finite.min()), np.log10(finite.max())
  cmap = plt.get_cmap("magma").with_extremes(bad="#3a9ad9")
  for ax, (label, (_, norms)) in zip(axes, results.items()):
    with np.errstate(divide="ignore", invalid="ignore"):
      grid = np.log10(np.stack([norms[n] for n in names]))
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap,
                      vmin=lo, vmax=hi, interpolation="nearest")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("step")
    ax.set_title(label)
  fig.colorbar(image, ax=axes, label="log10 gradient norm (blue: NaN/inf)")
  fig.suptitle("Per-layer gradient norms of a scanned transformer,"
               " from oc.clip_stats(scalars=True)")
  return _common.save(fig, "layer_norms")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=60)
  args = parser.parse_args(argv)
  x, y = make_regression(n_samples=1000, n_features=20, noise=10.0,
                         random_state=0)
  x, y = x.astype(np.float32), (y / SCALE).astype(np.float32)
  results = {label: run(t, x, y, args.steps) for label, t in RUNS.items()}
  rows = []
  for label, (losses, norms) in results.items():
    total = np.sqrt(sum(np.square(v) for v in norms.values()))
    bad = np.flatnonzero(~np.isfinite(total))
    first = int(bad[0]) + 1 if bad.size else None
    upto = (first - 1 if first else args.steps)
    peak = max(norms, key=lambda n: np.nanmax(norms[n][:upto]))
    rows.append([label, "-" if first is None else first, peak,
                 float(np.nanmax(norms[peak][:upto])), float(losses[-1])])
  print(f"{args.steps} SGD steps, batch {BATCH}, per-layer norms from"
        " clip_by_global_norm(leaf_norms=True, layer_axis=...):")
  _common.print_table(["run", "first non-finite step", "largest layer",
                       "its largest finite norm", "final loss"], rows)
  plot(results)


if __name__ == "__main__":
  main()
