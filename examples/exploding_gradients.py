"""Exploding gradients in a regression MLP, and three clippers that stop them.

A small MLP (20 -> 25 ReLU -> 1, He-uniform init) regresses the unscaled
targets of scikit-learn's ``make_regression`` with SGD (learning rate 0.01,
momentum 0.9, batch 32). The targets are in the hundreds, so the first
gradients are large, momentum amplifies them, and training without clipping
overflows to NaN within a few steps. Clipping each leaf's norm (Keras'
``clipnorm=1.0``), the global norm, or each element's value keeps it finite.

Every clipper records the pre-clip gradient norm in its state, where
``oc.clip_stats(optimizer.opt_state)`` reads it at no second pass over the
gradients. The norm curve here is ``oc.global_norm(grads)`` instead, one more
pass, so that the unclipped run, which has no clipper to record it, is drawn
from the same number. The table's last column but one is the share of steps
on which the clipper scaled something down.

Run from the repository root::

  python examples/exploding_gradients.py            # 100 epochs
  python examples/exploding_gradients.py --epochs 5 # smoke test
"""

from __future__ import annotations

import argparse
import time

import _common
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import make_regression

import optaxclip as oc

BATCH = 32
CLIPPERS = {  # Row label -> clipping transform (None: plain SGD).
    "none": None,
    "clip_by_norm(1.0)": oc.clip_by_norm(1.0),
    "clip_by_global_norm(1.0)": oc.clip_by_global_norm(1.0),
    "clip_by_value(5.0)": oc.clip_by_value(5.0, full_stats=True),
}


class MLP(nnx.Module):
  """20 inputs, 25 ReLU hidden units, 1 output."""

  def __init__(self, rngs: nnx.Rngs):
    init = nnx.initializers.he_uniform()
    self.hidden = nnx.Linear(20, 25, kernel_init=init, rngs=rngs)
    self.out = nnx.Linear(25, 1, kernel_init=init, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.hidden(x)))[:, 0]


def mse(model, x, y, weight=None):
  """Mean squared error; ``weight`` masks the padding of a short last batch."""
  err = jnp.square(model(x) - y)
  if weight is None:
    return jnp.mean(err)
  return jnp.sum(weight * err) / jnp.sum(weight)


@nnx.jit
def train_epoch(model, optimizer, data, key):
  """One shuffled pass over the training set.

  Returns the batch loss and pre-clip gradient norm of every step, then the
  train and test MSE at the end of the epoch.
  """
  x, y, x_test, y_test = data
  n = x.shape[0]
  steps = -(-n // BATCH)
  order = jnp.concatenate(
      [jax.random.permutation(key, n), jnp.zeros(steps * BATCH - n, jnp.int32)])
  weight = (jnp.arange(steps * BATCH) < n).astype(jnp.float32)

  @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0))
  def step(carry, idx, w):
    model, optimizer = carry
    loss, grads = nnx.value_and_grad(mse)(model, x[idx], y[idx], w)
    optimizer.update(model, grads)
    norm = oc.global_norm(grads)  # Before clipping.
    return (model, optimizer), (loss, norm)

  _, (losses, norms) = step((model, optimizer), order.reshape(steps, BATCH),
                            weight.reshape(steps, BATCH))
  return losses, norms, mse(model, x, y), mse(model, x_test, y_test)


def train(clipper, data, epochs: int) -> dict[str, np.ndarray]:
  """Trains a fresh model (same init and batch order for every clipper)."""
  model = MLP(nnx.Rngs(0))
  sgd = optax.sgd(0.01, momentum=0.9)
  tx = sgd if clipper is None else optax.chain(clipper, sgd)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x, y, x_test, y_test = data
  train_mse, test_mse = [mse(model, x, y)], [mse(model, x_test, y_test)]
  losses, norms = [], []
  for key in jax.random.split(jax.random.key(1), epochs):
    loss, norm, tr, te = train_epoch(model, optimizer, data, key)
    losses.append(loss)
    norms.append(norm)
    train_mse.append(tr)
    test_mse.append(te)
  stats = _common.own_stats(optimizer.opt_state)
  frac = (float(stats["num_clipped"]) / float(stats["count"])) if stats else None
  losses, norms, train_mse, test_mse = jax.device_get(
      (losses, norms, train_mse, test_mse))
  return {"losses": np.ravel(losses), "norms": np.ravel(norms),
          "train": np.asarray(train_mse), "test": np.asarray(test_mse),
          "frac_clipped": frac}


def load_data():
  x, y = make_regression(n_samples=1000, n_features=20, noise=0.1,
                         random_state=1)
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  return x[:500], y[:500], x[500:], y[500:]


def plot(results: dict[str, dict], epochs: int) -> None:
  """Loss per epoch (left) and pre-clip gradient norm per step (right)."""
  plt = _common.plt
  fig, (ax_loss, ax_norm) = plt.subplots(1, 2, figsize=(11, 4.2))
  top = 1e6  # Loss axis limit: a diverging run leaves the panel at the top.
  for (label, r), color in zip(results.items(), ["C3", "C0", "C2", "C1"]):
    steps_per_epoch = len(r["norms"]) // epochs
    step_epoch = np.arange(1, len(r["norms"]) + 1) / steps_per_epoch
    epoch = np.arange(epochs + 1)
    ok = np.isfinite(r["train"])
    ax_loss.plot(epoch[ok], r["train"][ok], color=color, label=label)
    ax_loss.plot(epoch[ok], r["test"][ok], color=color, ls="--", lw=1)
    ok_step = np.isfinite(r["norms"]) & np.isfinite(r["losses"])
    if not ok_step.all():  # Show the batch losses up to the first NaN/inf.
      dead = int(np.argmin(ok_step))
      ax_loss.plot(np.r_[0, step_epoch[:dead]],
                   np.r_[r["train"][0], r["losses"][:dead]], color=color)
      ax_loss.plot([step_epoch[dead]], [top], "x", color=color, ms=10, mew=2,
                   clip_on=False)
      ax_loss.annotate(f"{label}: loss NaN from step {dead + 1}",
                       (step_epoch[dead], top), textcoords="offset points",
                       xytext=(10, -12), color=color)
      ax_norm.plot([step_epoch[dead - 1]], [r["norms"][dead - 1]], "x",
                   color=color, ms=10, mew=2)
      ax_norm.annotate(f"{label}: gradient norm\n{r['norms'][dead - 1]:.1e},"
                       f" then inf/NaN", (step_epoch[dead - 1],
                                          r["norms"][dead - 1]),
                       textcoords="offset points", xytext=(10, -18), color=color)
    ok = np.isfinite(r["norms"])
    ax_norm.plot(step_epoch[ok], r["norms"][ok], color=color, lw=0.7,
                 label=label)
  ax_loss.set(yscale="log", ylim=(0.3, top), xlabel="epoch",
              ylabel="MSE (solid: train, dashed: test)",
              title="Loss; unclipped SGD diverges in its first epoch")
  ax_loss.legend(loc="upper right")
  ax_norm.axhline(1.0, color="gray", ls=":", lw=1)
  ax_norm.annotate("clipping threshold 1.0", (1.0, 1.0),
                   textcoords="offset points", xytext=(0, 4), color="gray")
  ax_norm.set(yscale="log", xscale="log", xlabel="epoch (log scale)",
              ylabel="global gradient norm before clipping",
              title="Gradient norm per step, before clipping")
  ax_norm.legend(loc="center right")
  fig.tight_layout()
  _common.save(fig, "exploding_gradients")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=100)
  args = parser.parse_args()
  data = load_data()
  results = {}
  for label, clipper in CLIPPERS.items():
    start = time.perf_counter()
    results[label] = train(clipper, data, args.epochs)
    results[label]["seconds"] = time.perf_counter() - start
  rows = []
  for label, r in results.items():
    frac = "-" if r["frac_clipped"] is None else f"{r['frac_clipped']:.3f}"
    rows.append([label, r["train"][-1], r["test"][-1], frac,
                 np.nanmax(r["norms"]), r["seconds"]])
  initial = results["none"]["train"][0]
  print(f"{args.epochs} epochs of SGD(0.01, momentum=0.9), batch {BATCH};"
        f" initial train MSE {initial:.4g}:")
  _common.print_table(["run", "train MSE", "test MSE", "share clipped",
                       "max grad norm", "seconds"], rows)
  plot(results, args.epochs)


if __name__ == "__main__":
  main()
