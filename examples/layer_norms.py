"""Per-layer gradient norms over a run, as a heatmap: where an explosion starts.

A deep MLP (20 -> 5 x 64 ReLU -> 1, He-uniform init) regresses the targets
of scikit-learn's ``make_regression`` (divided by 20) with SGD (learning rate
0.003, momentum 0.9). Two runs share the initialisation and the batches:

- ``clip_by_global_norm(inf, leaf_norms=True)`` never clips, but records
  each leaf's gradient norm: the run explodes, and the heatmap shows which
  layers blow up first and when;
- ``clip_by_global_norm(1.0, leaf_norms=True)`` clips, and stays finite.

The per-layer norms are the partial sums the clipper adds up for the global
norm anyway (no extra pass over the gradients); the jitted step reads them
with ``oc.clip_stats(opt_state, scalars=True)``, keyed by each leaf's path.

Run from the repository root::

  python examples/layer_norms.py             # 60 steps
  python examples/layer_norms.py --steps 20  # smoke test
"""

from __future__ import annotations

import argparse
import math

import _common
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import make_regression

import optaxclip as oc

BATCH = 32
WIDTH = 64
DEPTH = 5
SCALE = 20.0  # Targets scaled down: the run diverges after a few dozen steps.
RUNS = {
    "unclipped": math.inf,  # Records the norms, never clips.
    "clip_by_global_norm(1.0)": 1.0,
}
PREFIX = "clip_by_global_norm/leaf_norms/"


class MLP(nnx.Module):
  """``DEPTH`` ReLU layers of ``WIDTH`` units, then one linear output."""

  def __init__(self, rngs: nnx.Rngs):
    sizes = [20] + [WIDTH] * DEPTH
    init = nnx.initializers.he_uniform()
    self.layers = nnx.List([nnx.Linear(a, b, kernel_init=init, rngs=rngs)
                            for a, b in zip(sizes[:-1], sizes[1:])])
    self.out = nnx.Linear(WIDTH, 1, kernel_init=init, rngs=rngs)

  def __call__(self, x):
    for layer in self.layers:
      x = jax.nn.relu(layer(x))
    return self.out(x)[:, 0]


def mse(model, x, y):
  return jnp.mean(jnp.square(model(x) - y))


def run(threshold: float, x: np.ndarray, y: np.ndarray, steps: int
        ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Trains a fresh model; per-step losses and per-leaf pre-clip norms."""
  model = MLP(nnx.Rngs(0))
  tx = optax.chain(oc.clip_by_global_norm(threshold, leaf_norms=True),
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
  return np.asarray(losses), {k: np.asarray(v) for k, v in norms.items()}


def layer_order(name: str) -> tuple[int, str]:
  """Input layer first, the output layer last; kernel before bias."""
  parts = name.split("/")
  index = int(parts[1]) if parts[0] == "layers" else DEPTH
  return index, parts[-1] != "kernel"


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
  fig.suptitle("Per-layer gradient norms, from oc.clip_stats(scalars=True)")
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
        " clip_by_global_norm(leaf_norms=True):")
  _common.print_table(["run", "first non-finite step", "largest layer",
                       "its largest finite norm", "final loss"], rows)
  plot(results)


if __name__ == "__main__":
  main()
