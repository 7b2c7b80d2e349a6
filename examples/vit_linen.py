"""A Flax linen ViT with scanned, rematerialised blocks: per-layer norms, a
guarded step, and DP-SGD with ghost clipping.

The layout of big_vision's ViT, shrunk to scikit-learn's ``load_digits``
(8x8 images cut into 16 patches of 2x2 pixels, 10 classes): a patch
embedding, ``DEPTH`` pre-norm encoder blocks stacked by ``nn.scan`` over
``nn.remat`` (``params["Transformer"]["encoderblock"]``, one leading layer
axis per parameter), a final norm, mean pooling and a linear head. Three
runs share the initialisation and the batches:

- *adamw*: ``skip_step(chain(clip_by_global_norm(1.0, leaf_norms=True,
  layer_axis=oc.layer_axes(params, stacked="encoderblock")), adamw),
  rule=SpikeWindow(window=16))``, each step passing ``loss=``; the
  per-layer gradient norms come from the clipper's state;
- *adamw, bad batch*: the same with a bad batch planted (labels shuffled,
  the loss times 50): the rolling loss rule skips it, and the run goes on
  as if it never came;
- *DP-SGD (ghost)*: ``oc.clipped_grad(loss, clip=1.0, method="ghost")``:
  each example's gradient norm from the activations and output gradients
  that backpropagation computes anyway, inside the scanned, rematerialised
  blocks, then ``oc.dp_noise`` and Adam (``method="vmap"`` gives the same
  clipped sums, from per-example gradients).

Run from the repository root::

  python examples/vit_linen.py              # 200 steps
  python examples/vit_linen.py --steps 30   # smoke test
"""

from __future__ import annotations

import argparse
import time

import _common
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import optaxclip as oc

DIM, HEADS, MLP, DEPTH, PATCH = 32, 4, 64, 4, 2
BATCH = 32
LEARNING_RATE = 3e-3
NOISE = 0.8
BAD_STEP = 0.6  # The bad batch, as a fraction of the run.


class EncoderBlock(nn.Module):
  """Pre-norm attention and MLP, each residual; ``(x, None)`` for nn.scan."""

  @nn.compact
  def __call__(self, x, _):
    y = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=HEADS)(y, y)
    y = nn.Dense(MLP)(nn.LayerNorm()(x))
    return x + nn.Dense(DIM)(nn.gelu(y)), None


class Transformer(nn.Module):
  """The scanned, rematerialised blocks and the final norm."""

  @nn.compact
  def __call__(self, x):
    blocks = nn.scan(nn.remat(EncoderBlock), variable_axes={"params": 0},
                     split_rngs={"params": True}, length=DEPTH)
    x, _ = blocks(name="encoderblock")(x, None)
    return nn.LayerNorm(name="encoder_norm")(x)


class ViT(nn.Module):

  @nn.compact
  def __call__(self, images):
    b = images.shape[0]
    patches = images.reshape(b, 8 // PATCH, PATCH, 8 // PATCH, PATCH)
    patches = patches.transpose(0, 1, 3, 2, 4).reshape(b, -1, PATCH * PATCH)
    x = nn.Dense(DIM, name="embedding")(patches)
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02),
                       (1,) + x.shape[1:])
    x = Transformer(name="Transformer")(x)
    return nn.Dense(10, name="head")(x.mean(axis=1))


def load_data():
  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(x))
  x, y = x[order], y[order]
  return x[:1400], y[:1400], x[1400:], y[1400:]


def batches(x, y, steps):
  rng = np.random.default_rng(1)
  idx = rng.integers(0, len(x), (steps, BATCH))
  return jnp.asarray(x[idx]), jnp.asarray(y[idx])


def make_loss(model):
  def loss(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss


def make_guarded(model, params):
  """AdamW behind the guard, clipped, logging per-layer norms: a jitted
  ``run(xs, ys, bad)`` over the batches, batch ``bad`` planted (none for
  -1; traced, so that every run shares one compilation)."""
  layer_axis = oc.layer_axes(params, stacked="encoderblock")
  tx = oc.skip_step(optax.chain(
      oc.clip_by_global_norm(1.0, leaf_norms=True, layer_axis=layer_axis),
      optax.adamw(LEARNING_RATE)), rule=oc.SpikeWindow(window=16))
  loss_fn = make_loss(model)

  def step(carry, batch, bad):
    params, state = carry
    x, y, i = batch
    planted = i == bad
    y = jnp.where(planted, jnp.roll(y, 3), y)
    loss, grads = jax.value_and_grad(
        lambda p: loss_fn(p, x, y) * jnp.where(planted, 50.0, 1.0))(params)
    updates, state = tx.update(grads, state, params, loss=loss)
    stats = oc.clip_stats(state)
    blocks = stats["clip_by_global_norm/leaf_norms"]["Transformer"][
        "encoderblock"]
    per_layer = jnp.sqrt(sum(jnp.square(v)
                             for v in jax.tree_util.tree_leaves(blocks)))
    return (optax.apply_updates(params, updates), state), (
        loss, per_layer, stats["skip_step/skipped"])

  @jax.jit
  def run(xs, ys, bad):
    (last, _), logs = jax.lax.scan(
        lambda c, b: step(c, b, bad), (params, tx.init(params)),
        (xs, ys, jnp.arange(xs.shape[0])))
    return last, logs

  return run


def train_dp(model, params, xs, ys):
  """DP-SGD: ghost-clipped per-example gradients, noise, Adam."""
  loss_fn = make_loss(model)
  grad_fn = oc.clipped_grad(loss_fn, clip=1.0, batch_argnums=(1, 2),
                            method="ghost")
  tx = optax.chain(oc.dp_noise(NOISE, key=0, batch_size=BATCH),
                   optax.adam(LEARNING_RATE))

  def step(carry, batch):
    params, state = carry
    x, y = batch
    grads, info = grad_fn(params, x, y)
    updates, state = tx.update(grads, state, params, clip_info=info)
    return (optax.apply_updates(params, updates), state), loss_fn(
        params, x, y)

  run = jax.jit(lambda c, b: jax.lax.scan(step, c, b))
  (params, _), losses = run((params, tx.init(params)), (xs, ys))
  return params, np.asarray(losses)


def accuracy(model, params, x, y) -> float:
  logits = jax.jit(model.apply)({"params": params}, jnp.asarray(x))
  return float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(y)))


def plot(results, norms, bad):
  plt = _common.plt
  fig, (ax_loss, ax_norm) = plt.subplots(1, 2, figsize=(12, 4))
  for label, r in results.items():
    ax_loss.plot(np.minimum(r["losses"], 10.0), lw=0.8, label=label)
  ax_loss.axvline(bad, color="gray", ls=":", lw=0.8)
  ax_loss.set(xlabel="step", ylabel="training loss (capped at 10)",
              title="linen ViT on load_digits")
  ax_loss.legend()
  im = ax_norm.imshow(np.log10(norms.T), aspect="auto", origin="lower",
                      interpolation="nearest", cmap="viridis")
  fig.colorbar(im, ax=ax_norm, label="log10 gradient norm")
  ax_norm.set(xlabel="step", ylabel="encoder block (scan layer)",
              title="Per-layer gradient norms (layer_axes, 'adamw' run)")
  fig.tight_layout()
  _common.save(fig, "vit_linen")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=200)
  args = parser.parse_args()
  x_train, y_train, x_test, y_test = load_data()
  model = ViT()
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8, 8)))[
      "params"]
  xs, ys = batches(x_train, y_train, args.steps)
  bad = int(BAD_STEP * args.steps)
  results, rows = {}, []
  clean = np.arange(args.steps) != bad
  guarded = make_guarded(model, params)
  for label, planted in (("adamw", -1), ("adamw, bad batch", bad)):
    start = time.perf_counter()
    p, (losses, norms, skipped) = jax.device_get(
        guarded(xs, ys, jnp.int32(planted)))
    results[label] = {"losses": losses, "norms": norms}
    rows.append([label, accuracy(model, p, x_test, y_test),
                 float(np.mean(losses[clean][-20:])), str(int(skipped.sum())),
                 str([int(i) for i in np.flatnonzero(skipped)][:4]),
                 time.perf_counter() - start])
  start = time.perf_counter()
  p, losses = train_dp(model, params, xs, ys)
  results["DP-SGD (ghost)"] = {"losses": losses}
  rows.append(["DP-SGD (ghost)", accuracy(model, p, x_test, y_test),
               float(np.mean(losses[clean][-20:])), "-", "-",
               time.perf_counter() - start])
  print(f"{args.steps} steps, batch {BATCH}, linen ViT ({DEPTH} scanned,"
        f" rematerialised blocks, width {DIM}); bad batch at step {bad}:")
  _common.print_table(["run", "test accuracy", "clean train loss (last 20)",
                       "steps skipped", "which", "seconds"], rows)
  norms = results["adamw"]["norms"]
  print("\nper-layer gradient norms of the 'adamw' run (oc.layer_axes):")
  _common.print_table(
      ["step"] + [f"layer {i}" for i in range(DEPTH)],
      [[str(s)] + list(norms[s]) for s in (0, args.steps // 2,
                                           args.steps - 1)])
  plot(results, norms, bad)


if __name__ == "__main__":
  main()
