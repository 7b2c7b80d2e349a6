"""Different clippers for different parameter groups, with a scheduled threshold.

A bag-of-words regressor (a 1000-token embedding table, mean-pooled, then a
ReLU MLP) learns the sum of hidden per-token scores over Zipf-distributed
sequences, with SGD at a learning rate of 0.1 and momentum 0.9.
``optax.multi_transform`` gives the embedding table its own clipper
(``oc.clip_by_value``: each row's update is capped elementwise, so a frequent
token cannot take a huge step) and the dense layers another
(``oc.clip_by_global_norm`` whose threshold follows an Optax schedule).
One global norm over everything ties the two groups together: when the dense
layers' gradient is large, the embedding update is scaled down with it.
``oc.clip_stats`` reports each group's clipper under its own name. A last
run gives both groups adaptive gradient clipping (``oc.adaptive_grad_clip``,
each unit's update at most 0.1 times its weights' norm), whose units differ by
group: a row of the embedding table, an output column of a dense kernel.

Run from the repository root::

  python examples/per_group.py          # 2000 steps
  python examples/per_group.py --small  # smoke test
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

import optaxclip as oc

VOCAB, DIM, LENGTH, BATCH = 1000, 16, 20, 32
CHUNK = 100  # Training steps per jitted call.


class BagOfWords(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, DIM, rngs=rngs)
    self.hidden = nnx.Linear(DIM, 32, rngs=rngs)
    self.out = nnx.Linear(32, 1, rngs=rngs)

  def __call__(self, tokens):
    pooled = self.embed(tokens).mean(axis=1)
    return self.out(jax.nn.relu(self.hidden(pooled)))[:, 0]


def group_of(params):
  """``"embed"`` for the embedding table, ``"dense"`` for everything else."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "embed" if path[0].key == "embed" else "dense", params)


def optimizers(steps: int) -> dict[str, optax.GradientTransformation | None]:
  """Row label -> clipping transform (``None``: plain SGD)."""
  decay = optax.linear_schedule(2.0, 0.3, transition_steps=steps)
  return {
      "none": None,
      "clip_by_global_norm(1.0)": oc.clip_by_global_norm(1.0),
      "per_group(constant)": optax.multi_transform(
          {"embed": oc.clip_by_value(0.1, full_stats=True),
           "dense": oc.clip_by_global_norm(1.0)}, group_of),
      "per_group(schedule)": optax.multi_transform(
          {"embed": oc.clip_by_value(0.1, full_stats=True),
           "dense": oc.clip_by_global_norm(decay)}, group_of),
      # AGC's units differ by group: an embedding's unit is a row (reduce
      # axis 1), a dense kernel's an output column (the default).
      "per_group(agc)": optax.multi_transform(
          {"embed": oc.adaptive_grad_clip(0.1, axis=1),
           "dense": oc.adaptive_grad_clip(0.1)}, group_of),
  }


def make_data(key, n: int):
  """Zipf-distributed token sequences; target: the sum of the tokens' scores."""
  probs = 1.0 / np.arange(1, VOCAB + 1)
  tokens = jax.random.choice(key, VOCAB, (n, LENGTH), p=probs / probs.sum())
  scores = 3.0 * jax.random.normal(jax.random.key(42), (VOCAB,))
  return tokens, scores[tokens].sum(axis=1)


def mse(model, tokens, y):
  return jnp.mean(jnp.square(model(tokens) - y))


@nnx.jit
def train_chunk(model, optimizer, tokens, y, key):
  """``CHUNK`` SGD steps on random batches; per-step loss and clip stats."""

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
  def step(carry, idx):
    model, optimizer = carry
    loss, grads = nnx.value_and_grad(mse)(model, tokens[idx], y[idx])
    optimizer.update(model, grads)
    return (model, optimizer), (loss, _common.all_stats(optimizer.opt_state))

  idx = jax.random.randint(key, (CHUNK, BATCH), 0, tokens.shape[0])
  _, (losses, stats) = step((model, optimizer), idx)
  return losses, stats


def train(clipper, data, steps: int) -> dict:
  (tokens, y), (tokens_test, y_test) = data
  model = BagOfWords(nnx.Rngs(0))
  sgd = optax.sgd(0.1, momentum=0.9)
  tx = sgd if clipper is None else optax.chain(clipper, sgd)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  losses, stats = [], []
  for key in jax.random.split(jax.random.key(3), steps // CHUNK):
    loss, stat = train_chunk(model, optimizer, tokens, y, key)
    losses.append(loss)
    stats.append(stat)
  stats = jax.tree.map(lambda *xs: np.concatenate(xs), *jax.device_get(stats))
  return {"losses": np.concatenate(jax.device_get(losses)), "stats": stats,
          "test": float(mse(model, tokens_test, y_test))}


def smooth(x: np.ndarray, window: int) -> np.ndarray:
  return np.convolve(x, np.ones(window) / window, mode="valid")


def plot(results: dict[str, dict]) -> None:
  plt = _common.plt
  fig, (ax_loss, ax_norm) = plt.subplots(1, 2, figsize=(11, 4.2))
  window, top = 50, 1e3
  for (label, r), color in zip(results.items(), ["C3", "C0", "C1", "C2", "C4"]):
    ok = np.isfinite(r["losses"])
    dead = len(ok) if ok.all() else int(np.argmin(ok))
    if dead < len(ok):  # Show its raw losses up to the first NaN.
      ax_loss.plot(np.arange(1, dead + 1), r["losses"][:dead], color=color,
                   lw=0.8, label=f"{label}: NaN from step {dead + 1}")
      ax_loss.plot([dead], [top], "x", color=color, ms=10, mew=2, clip_on=False)
      continue
    loss = smooth(r["losses"], window)
    ax_loss.plot(np.arange(window, len(r["losses"]) + 1), loss, color=color,
                 label=f"{label}: test MSE {r['test']:.3g}")
  ax_loss.set(yscale="log", ylim=(None, top), xlabel="training step",
              ylabel=f"batch MSE (clipped runs: mean of {window} steps)",
              title="Training loss")
  ax_loss.legend(fontsize=9)
  stats = results["per_group(schedule)"]["stats"]
  step = np.arange(1, len(stats["clip_by_global_norm/norm"]) + 1)
  w = 20
  ax_norm.plot(step[w - 1:], smooth(stats["clip_by_global_norm/norm"], w),
               "C0", lw=1, label="dense layers: global norm before clipping")
  ax_norm.plot(step, stats["clip_by_global_norm/threshold"], "k--",
               label="dense layers: threshold (linear schedule 2.0 -> 0.3)")
  ax_norm.plot(step[w - 1:], smooth(stats["clip_by_value/norm"], w),
               "C1", lw=1, label="embeddings: norm before clip_by_value(0.1)")
  ax_norm.set(yscale="log", ylim=(None, 300), xlabel="training step",
              ylabel=f"from oc.clip_stats (norms: mean of {w} steps)",
              title="per_group(schedule): each group's clipper")
  ax_norm.legend(fontsize=9, loc="upper right")
  fig.tight_layout()
  _common.save(fig, "per_group")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true",
                      help="fewer training steps (smoke test)")
  args = parser.parse_args()
  steps = 400 if args.small else 2000
  data = (make_data(jax.random.key(0), 4000), make_data(jax.random.key(1), 2000))
  results, rows = {}, []
  for label, clipper in optimizers(steps).items():
    start = time.perf_counter()
    r = results[label] = train(clipper, data, steps)
    tail = r["losses"][-steps // 10:]
    rows.append([label, float(np.mean(tail)), r["test"],
                 time.perf_counter() - start])
  print(f"{steps} steps of SGD(0.1, momentum=0.9); the targets' variance is"
        f" {float(jnp.var(data[1][1])):.4g} (MSE of predicting the mean):")
  _common.print_table(["run", "final train MSE", "test MSE", "seconds"], rows)

  stats = results["per_group(schedule)"]["stats"]
  rows = []
  for group, name in [("embed", "clip_by_value"), ("dense", "clip_by_global_norm")]:
    threshold = stats.get(f"{name}/threshold", np.array([0.1]))
    elements = stats.get(f"{name}/frac_clipped")
    rows.append([group, name, float(stats[f"{name}/num_clipped"][-1]) / steps,
                 "-" if elements is None else float(np.mean(elements)),
                 float(np.median(stats[f"{name}/norm"])),
                 float(threshold[0]), float(threshold[-1])])
  print("\nper_group(schedule), from oc.clip_stats:")
  _common.print_table(["group", "clipper", "steps clipped", "elements clipped",
                       "median norm", "first threshold", "last threshold"], rows)
  plot(results)


if __name__ == "__main__":
  main()
