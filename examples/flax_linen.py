"""Clipping in a Flax linen ``TrainState`` train step, with the norm logged.

The main demo's regression problem (``exploding_gradients.py``) with a linen
MLP. The clipper sits in the ``tx`` chain given to
``flax.training.train_state.TrainState``; ``state.apply_gradients`` runs it,
and ``oc.clip_stats(state.opt_state)`` reads what it did, inside the jitted
step, for logging. ``clip_by_global_norm(inf)`` never clips but still records
the norm, so the unclipped run is logged the same way.

Run from the repository root::

  python examples/flax_linen.py            # 100 epochs
  python examples/flax_linen.py --epochs 5 # smoke test
"""

from __future__ import annotations

import argparse
import math
import time

import _common
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from exploding_gradients import BATCH, load_data
from flax.training import train_state

import optaxclip as oc


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    init = nn.initializers.he_uniform()
    x = nn.relu(nn.Dense(25, kernel_init=init)(x))
    return nn.Dense(1, kernel_init=init)(x)[:, 0]


def create_state(max_norm: float) -> train_state.TrainState:
  model = MLP()
  params = model.init(jax.random.key(0), jnp.zeros((1, 20)))["params"]
  tx = optax.chain(oc.clip_by_global_norm(max_norm),
                   optax.sgd(0.01, momentum=0.9))
  return train_state.TrainState.create(apply_fn=model.apply, params=params,
                                       tx=tx)


def train_step(state, x, y, weight):
  def loss_fn(params):
    err = jnp.square(state.apply_fn({"params": params}, x) - y)
    return jnp.sum(weight * err) / jnp.sum(weight)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  state = state.apply_gradients(grads=grads)
  stats = oc.clip_stats(state.opt_state)
  return state, {"loss": loss,
                 "norm": stats["clip_by_global_norm/norm"],
                 "clipped": stats["clip_by_global_norm/clipped"]}


@jax.jit
def train_epoch(state, x, y, key):
  """One shuffled pass (the last short batch padded and masked out)."""
  n = x.shape[0]
  steps = -(-n // BATCH)
  order = jnp.concatenate(
      [jax.random.permutation(key, n), jnp.zeros(steps * BATCH - n, jnp.int32)])
  order = order.reshape(steps, BATCH)
  weight = (jnp.arange(steps * BATCH) < n).astype(jnp.float32)

  def step(state, batch):
    idx, w = batch
    return train_step(state, x[idx], y[idx], w)

  return jax.lax.scan(step, state, (order, weight.reshape(steps, BATCH)))


@jax.jit
def evaluate(state, x, y):
  return jnp.mean(jnp.square(state.apply_fn({"params": state.params}, x) - y))


def train(max_norm: float, epochs: int, log: bool) -> dict:
  x, y, x_test, y_test = load_data()
  state = create_state(max_norm)
  logs, train_mse = [], []
  for epoch, key in enumerate(jax.random.split(jax.random.key(1), epochs), 1):
    state, metrics = train_epoch(state, x, y, key)
    logs.append(metrics)
    train_mse.append(evaluate(state, x, y))
    if log and (epoch == 1 or epoch % 20 == 0):
      stats = oc.clip_stats(state.opt_state)
      norm = float(stats["clip_by_global_norm/norm"])
      done = int(stats["clip_by_global_norm/num_clipped"])
      count = int(stats["clip_by_global_norm/count"])
      print(f"  epoch {epoch:3d}: train MSE {float(train_mse[-1]):9.4g},"
            f" last grad norm {norm:8.4g}, clipped {done}/{count} steps")
  stats = oc.clip_stats(state.opt_state)
  logs = jax.device_get(logs)
  return {"train": np.asarray(jax.device_get(train_mse)),
          "test": float(evaluate(state, x_test, y_test)),
          "losses": np.concatenate([m["loss"] for m in logs]),
          "norms": np.concatenate([m["norm"] for m in logs]),
          "frac_clipped": int(stats["clip_by_global_norm/num_clipped"])
                          / int(stats["clip_by_global_norm/count"])}


def plot(results: dict[str, dict], epochs: int) -> None:
  plt = _common.plt
  fig, (ax_loss, ax_norm) = plt.subplots(1, 2, figsize=(11, 4))
  for (label, r), color in zip(results.items(), ["C3", "C2"]):
    ok = np.isfinite(r["train"])
    ax_loss.plot(np.arange(1, epochs + 1)[ok], r["train"][ok], color=color,
                 label=label)
    if not ok.all():
      ax_loss.text(0.97, 0.75, f"{label}:\nNaN from epoch {np.argmin(ok) + 1}",
                   transform=ax_loss.transAxes, ha="right", color=color)
    per_epoch = len(r["norms"]) // epochs
    ok = np.isfinite(r["norms"])
    ax_norm.plot((np.arange(len(ok)) + 1)[ok] / per_epoch, r["norms"][ok],
                 color=color, lw=0.7, label=label)
    if not ok.all():
      last = int(np.argmin(ok)) - 1
      ax_norm.plot([(last + 1) / per_epoch], [r["norms"][last]], "x",
                   color=color, ms=10, mew=2)
      ax_norm.annotate(f"{label}: inf/NaN from step {last + 2}",
                       ((last + 1) / per_epoch, r["norms"][last]),
                       textcoords="offset points", xytext=(10, -4), color=color)
  ax_loss.set(yscale="log", xlabel="epoch", ylabel="train MSE",
              title="linen TrainState: train MSE per epoch")
  ax_loss.legend()
  ax_norm.set(yscale="log", xscale="log", xlabel="epoch (log scale)",
              ylabel="norm from oc.clip_stats(state.opt_state)",
              title="Logged pre-clip gradient norm per step")
  fig.tight_layout()
  _common.save(fig, "flax_linen")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, default=100)
  args = parser.parse_args()
  results, rows = {}, []
  for max_norm in (math.inf, 1.0):
    label = f"clip_by_global_norm({max_norm})"
    if max_norm == 1.0:
      print(f"Training log of {label}:")
    start = time.perf_counter()
    r = results[label] = train(max_norm, args.epochs, log=max_norm == 1.0)
    rows.append([label, r["train"][-1], r["test"], f"{r['frac_clipped']:.3f}",
                 float(np.nanmax(r["norms"])), time.perf_counter() - start])
  print(f"\n{args.epochs} epochs, linen TrainState, SGD(0.01, momentum=0.9):")
  _common.print_table(["run", "train MSE", "test MSE", "steps clipped",
                       "max grad norm", "seconds"], rows)
  plot(results, args.epochs)


if __name__ == "__main__":
  main()
