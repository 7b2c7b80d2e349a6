"""An Equinox MLP with stacked residual blocks: per-layer gradient norms and
clipping, the layer axes read off the model.

A residual MLP classifies scikit-learn's ``load_digits`` (64 pixels, 10
classes). Its ``DEPTH`` hidden blocks are made by ``eqx.filter_vmap``
(one ``Block`` whose arrays carry a leading layer axis, as Equinox and
levanter stack layers) and run by ``jax.lax.scan``. ``oc.layer_axes(model,
stacked="layers")`` gives the ``layer_axis`` tree, an Equinox module like
the gradients, so that ``leaf_norms=True`` records one norm per layer.
Two runs, same initialisation and batches: Adam alone
(``clip_by_global_norm(inf)`` records the norms and never clips), and
Adam after ``clip_by_global_norm(1.0)``.

Run from the repository root::

  python examples/equinox_mlp.py              # 300 steps
  python examples/equinox_mlp.py --steps 40   # smoke test
"""

from __future__ import annotations

import argparse
import math
import time

import _common
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import optaxclip as oc

WIDTH, DEPTH, BATCH = 64, 6, 64
LEARNING_RATE = 0.03


class Block(eqx.Module):
  norm: eqx.nn.LayerNorm
  linear: eqx.nn.Linear

  def __init__(self, key):
    self.norm = eqx.nn.LayerNorm(WIDTH)
    self.linear = eqx.nn.Linear(WIDTH, WIDTH, key=key)

  def __call__(self, x):
    return x + jax.nn.relu(self.linear(self.norm(x)))


class MLP(eqx.Module):
  embed: eqx.nn.Linear
  layers: Block  # DEPTH blocks, stacked along a leading axis.
  head: eqx.nn.Linear

  def __init__(self, key):
    k1, k2, k3 = jax.random.split(key, 3)
    self.embed = eqx.nn.Linear(64, WIDTH, key=k1)
    self.layers = eqx.filter_vmap(Block)(jax.random.split(k2, DEPTH))
    self.head = eqx.nn.Linear(WIDTH, 10, key=k3)

  def __call__(self, x):
    params, static = eqx.partition(self.layers, eqx.is_array)

    def body(h, layer):
      return eqx.combine(layer, static)(h), None

    h, _ = jax.lax.scan(body, self.embed(x), params)
    return self.head(h)


def load_data():
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(x))
  return x[order][:1400], y[order][:1400], x[order][1400:], y[order][1400:]


def train(max_norm, xs, ys):
  model = MLP(jax.random.key(0))
  params, static = eqx.partition(model, eqx.is_inexact_array)
  tx = optax.chain(
      oc.clip_by_global_norm(max_norm, leaf_norms=True,
                             layer_axis=oc.layer_axes(params,
                                                      stacked="layers")),
      optax.adam(LEARNING_RATE))

  def loss_fn(params, x, y):
    logits = jax.vmap(eqx.combine(params, static))(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(carry, batch):
    params, state = carry
    loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
    updates, state = tx.update(grads, state, params)
    norms = state[0].stats.leaf_norms.layers
    per_layer = jnp.sqrt(sum(jnp.square(v)
                             for v in jax.tree_util.tree_leaves(norms)))
    return (eqx.apply_updates(params, updates), state), (
        loss, per_layer, state[0].stats.norm)

  run = jax.jit(lambda c, b: jax.lax.scan(step, c, b))
  (params, state), (losses, per_layer, norms) = run(
      (params, tx.init(params)), (xs, ys))
  return eqx.combine(params, static), state, jax.device_get(
      (losses, per_layer, norms))


def plot(results):
  plt = _common.plt
  fig, axes = plt.subplots(1, len(results), figsize=(12, 4), sharey=True)
  for ax, (label, r) in zip(axes, results.items()):
    per_layer = r["per_layer"]
    for i in range(per_layer.shape[1]):
      ax.plot(per_layer[:, i], lw=0.8, label=f"block {i}")
    ax.set(yscale="log", xlabel="step", title=label)
  axes[0].set_ylabel("gradient norm per block (layer_axes)")
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  _common.save(fig, "equinox_mlp")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  args = parser.parse_args()
  x, y, x_test, y_test = load_data()
  idx = np.random.default_rng(1).integers(0, len(x), (args.steps, BATCH))
  xs, ys = jnp.asarray(x[idx]), jnp.asarray(y[idx])
  results, rows = {}, []
  for max_norm in (math.inf, 1.0):
    label = f"clip_by_global_norm({max_norm})"
    start = time.perf_counter()
    model, state, (losses, per_layer, norms) = train(max_norm, xs, ys)
    logits = jax.vmap(model)(jnp.asarray(x_test))
    acc = float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(y_test)))
    results[label] = {"per_layer": per_layer}
    rows.append([label, acc, float(np.mean(losses[-20:])),
                 float(np.max(norms)), int(state[0].stats.num_clipped),
                 time.perf_counter() - start])
  print(f"{args.steps} steps of Adam({LEARNING_RATE}), batch {BATCH}, an"
        f" Equinox MLP with {DEPTH} stacked blocks on load_digits:")
  _common.print_table(["run", "test accuracy", "train loss (last 20)",
                       "max grad norm", "steps clipped", "seconds"], rows)
  plot(results)


if __name__ == "__main__":
  main()
