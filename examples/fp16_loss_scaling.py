"""float16 training with a dynamic loss scale: the scale, the skipped steps.

An MLP (64 -> 3 x 128 -> 10, ReLU) classifies scikit-learn's 8x8 digits with
Adam behind ``oc.clip_by_global_norm(1.0)``. The forward and backward passes
run in float16; the weights are kept in float32 (the master copy, as
``torch.amp`` and Micikevicius et al. 2018 do) and cast to float16 at every
use, so their gradients arrive in float32, computed in float16. Three runs
share the initialisation and the batches:

- ``float32``: everything in float32, the reference;
- ``float16``: float16 compute, no loss scale: small gradients underflow to
  zero in the float16 backward pass;
- ``float16 + dynamic_loss_scale``: the loss is multiplied by
  ``oc.loss_scale(opt_state)`` before differentiating, and
  ``oc.dynamic_loss_scale`` divides the gradients by it, skips the steps
  whose gradients overflowed float16 (leaving Adam's moments as they were),
  halves the scale then, and doubles it after ``GROWTH_INTERVAL`` good
  steps: the scale climbs to where the float16 backward pass overflows and
  saw-tooths below it.

Every step also measures, at the same weights, the share of gradient
entries that are non-zero in float32 but zero in the run's own gradients:
what float16 underflow took.

Run from the repository root::

  python examples/fp16_loss_scaling.py              # 600 steps
  python examples/fp16_loss_scaling.py --steps 120 --growth-interval 4
"""
from __future__ import annotations

import argparse

import _common
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import optaxclip as oc

BATCH = 256
WIDTHS = (64, 128, 128, 128, 10)
GROWTH_INTERVAL = 20  # torch's default is 2000; short here to show the cycle.
LOSS_WEIGHT = 1e-3  # A small loss (e.g. one term of many): small gradients.
RUNS = ("float32", "float16", "float16 + dynamic_loss_scale")


def init(key: jax.Array) -> list[dict[str, jax.Array]]:
  keys = jax.random.split(key, len(WIDTHS) - 1)
  return [{"w": jax.random.normal(k, (a, b)) * np.sqrt(2.0 / a),
           "b": jnp.zeros(b)} for k, a, b in zip(keys, WIDTHS, WIDTHS[1:])]


def loss_fn(params, x, y, dtype, scale=1.0):
  """The weighted cross-entropy (float32) of the MLP run in ``dtype``, times
  ``scale``; the unscaled loss as auxiliary output."""
  h = x.astype(dtype)
  for i, layer in enumerate(params):
    h = h @ layer["w"].astype(dtype) + layer["b"].astype(dtype)
    if i < len(params) - 1:
      h = jax.nn.relu(h)
  logp = jax.nn.log_softmax(h.astype(jnp.float32))
  loss = -LOSS_WEIGHT * jnp.mean(jnp.take_along_axis(logp, y[:, None], 1))
  return loss * scale, loss


def lost_share(grads, exact) -> jax.Array:
  """The share of entries non-zero in ``exact`` but zero in ``grads``."""
  g, e = (jnp.concatenate([jnp.ravel(v) for v in jax.tree.leaves(t)])
          for t in (grads, exact))
  return jnp.mean((g == 0) & (e != 0))


def run(name: str, x: np.ndarray, y: np.ndarray, steps: int,
        growth_interval: int) -> dict:
  """Trains a fresh MLP; per-step losses, lost shares, and (loss scale)
  the scale and the skipped steps."""
  dtype = jnp.float32 if name == "float32" else jnp.float16
  opt = optax.chain(oc.clip_by_global_norm(1.0), optax.adam(1e-3))
  if "loss_scale" in name:
    opt = oc.dynamic_loss_scale(opt, growth_interval=growth_interval)
  params = init(jax.random.PRNGKey(0))
  order = np.random.default_rng(1).integers(0, len(x), (steps, BATCH))

  @jax.jit
  def train(params, xs, ys):
    def step(carry, batch):
      params, state = carry
      xb, yb = batch
      scale = oc.loss_scale(state) if "loss_scale" in name else 1.0
      grads, loss = jax.grad(loss_fn, has_aux=True)(params, xb, yb, dtype,
                                                    scale)
      unscaled = jax.tree.map(lambda g: g / scale, grads)
      exact = unscaled if dtype == jnp.float32 else jax.grad(
          loss_fn, has_aux=True)(params, xb, yb, jnp.float32)[0]
      updates, state = opt.update(grads, state, params)
      params = optax.apply_updates(params, updates)
      record = {"loss": loss, "lost": lost_share(unscaled, exact)}
      if "loss_scale" in name:
        record["scale"] = scale
        record["skipped"] = oc.clip_stats(state)["skip_step/skipped"]
      return (params, state), record

    return jax.lax.scan(step, (params, opt.init(params)), (xs, ys))

  (params, _), record = train(params, jnp.asarray(x[order]),
                              jnp.asarray(y[order]))
  out = {k: np.asarray(v) for k, v in record.items()}
  loss = loss_fn(params, x, y, dtype)[1]  # On all the data.
  out["final loss"] = float(loss) / LOSS_WEIGHT
  return out


def plot(results: dict[str, dict]) -> None:
  plt = _common.plt
  fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4),
                                      constrained_layout=True)
  styles = {RUNS[0]: dict(color="k", ls="--"), RUNS[1]: dict(color="C1"),
            RUNS[2]: dict(color="C2")}
  for name, r in results.items():
    ax1.plot(r["loss"] / LOSS_WEIGHT, label=name, lw=1, **styles[name])
    ax3.plot(r["lost"], label=name, lw=1, **styles[name])
  ax1.set_yscale("log")
  ax1.set_xlabel("step")
  ax1.set_ylabel("cross-entropy")
  ax1.set_title("training loss")
  ax1.legend()
  scaled = results[RUNS[2]]
  steps = np.arange(len(scaled["scale"]))
  ax2.step(steps, np.log2(scaled["scale"]), where="post", color="C2")
  bad = scaled["skipped"].astype(bool)
  ax2.plot(steps[bad], np.log2(scaled["scale"][bad]), "rx",
           label=f"skipped: overflow ({int(bad.sum())})")
  ax2.set_xlabel("step")
  ax2.set_ylabel("log2 loss scale (used at the step)")
  ax2.set_title("dynamic_loss_scale: the scale")
  ax2.legend()
  ax3.set_xlabel("step")
  ax3.set_ylabel("share of gradient entries")
  ax3.set_title("lost to float16 underflow")
  ax3.legend()
  fig.suptitle("float16 compute, float32 master weights: MLP on digits")
  _common.save(fig, "fp16_loss_scaling")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--growth-interval", type=int, default=GROWTH_INTERVAL)
  args = parser.parse_args(argv)
  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  results = {name: run(name, x, y.astype(np.int32), args.steps,
                      args.growth_interval) for name in RUNS}
  rows = []
  for name, r in results.items():
    scale = r.get("scale")
    rows.append([name, r["final loss"], float(np.mean(r["lost"])),
                 int(r["skipped"].sum()) if scale is not None else "-",
                 float(scale.max()) if scale is not None else "-",
                 float(scale[-1]) if scale is not None else "-"])
  print(f"{args.steps} Adam steps, batch {BATCH}, growth_interval"
        f" {args.growth_interval}:")
  _common.print_table(["run", "final loss", "mean lost share",
                       "steps skipped", "largest scale", "last scale"], rows)
  plot(results)


if __name__ == "__main__":
  main()
