"""DP-SGD on handwritten digits: accuracy against the privacy spent.

A small Flax NNX MLP learns scikit-learn's bundled 8x8 digits (1,797 images,
no download) with DP-SGD (Abadi et al. 2016): every step samples a batch by
Poisson sampling (each training image joins with probability ``q``), clips
each example's gradient with ``oc.clipped_grad``, and adds Gaussian noise
calibrated to the clipping with ``oc.dp_noise``, chained into Adam. Poisson
sampling gives batches of varying size; each is padded to a fixed shape and
the padding marked by ``example_mask``, so the step jits once. The same model, initialisation and samples are trained without privacy
(no clipping, no noise) and at several noise multipliers, and once with the
adaptive clipping norm of Andrew et al. (2021), ``oc.quantile_norm``.

The privacy spent, epsilon at delta = 1e-5, comes from the RDP accountant of
Google's ``dp-accounting`` package (``pip install dp-accounting``) for the
Poisson-sampled Gaussian mechanism composed over the steps. It is computed by
this script, not by optaxclip: accounting is the user's. Without the package
the table says so. The script prints a table of accuracy against epsilon and
saves ``examples/output/dp_sgd.png``.

Run from the repository root::

  python examples/dp_sgd.py          # full size, under a minute on 2 CPU cores
  python examples/dp_sgd.py --small  # smoke test
"""

from __future__ import annotations

import argparse
import logging
import time

import _common
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import optaxclip as oc

DELTA = 1e-5
MAX_NORM = 1.0
EXPECTED_BATCH = 128
CAPACITY = 192  # The fixed batch shape that holds a Poisson sample.
LEARNING_RATE = 3e-3
CHUNK = 25  # Steps per jitted call; the accuracy is measured between calls.


class MLP(nnx.Module):

  def __init__(self, rngs: nnx.Rngs, hidden: int = 64):
    self.hidden = nnx.Linear(64, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, 10, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.hidden(x)))


def make_loss(graphdef):
  def loss(params, x, y):
    logits = nnx.merge(graphdef, params)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss


def train(noise_multiplier, max_norm, data, args, noise_key=0):
  """One run: returns test accuracy after each chunk and clip statistics."""
  x_train, y_train, x_test, y_test = data
  graphdef, params = nnx.split(MLP(nnx.Rngs(0)), nnx.Param)
  loss = make_loss(graphdef)
  adaptive = isinstance(max_norm, oc.QuantileNorm)
  grad_fn = oc.clipped_grad(loss, clip=1.0 if adaptive else max_norm,
                            batch_argnums=(1, 2))
  tx = optax.chain(
      oc.dp_noise(noise_multiplier, key=noise_key, batch_size=EXPECTED_BATCH,
                  adaptive_norm=max_norm if adaptive else None),
      optax.adam(LEARNING_RATE))
  q = EXPECTED_BATCH / len(x_train)

  @jax.jit
  def chunk(params, state, key):
    def step(carry, key):
      params, state = carry
      x, y, mask = poisson_batch(key, x_train, y_train, q)
      dp = state[0]
      grads, info = grad_fn(params, x, y, example_mask=mask,
                            max_norm=dp.next_threshold if adaptive else None)
      updates, state = tx.update(grads, state, params, clip_info=info)
      params = optax.apply_updates(params, updates)
      dp = state[0]
      return (params, state), (dp.stats.frac_clipped, dp.stats.threshold)

    keys = jax.random.split(key, CHUNK)
    (params, state), stats = jax.lax.scan(step, (params, state), keys)
    return params, state, stats

  @jax.jit
  def accuracy(params):
    logits = nnx.merge(graphdef, params)(x_test)
    return jnp.mean(jnp.argmax(logits, -1) == y_test)

  state = tx.init(params)
  key = jax.random.PRNGKey(1)  # The same samples for every run.
  accs, fracs, thresholds = [], [], []
  for _ in range(args.steps // CHUNK):
    key, sub = jax.random.split(key)
    params, state, (frac, threshold) = chunk(params, state, sub)
    accs.append(accuracy(params))
    fracs.append(frac)
    thresholds.append(threshold)
  accs, fracs, thresholds = jax.device_get((accs, fracs, thresholds))
  return {"accuracy": np.asarray(accs), "frac_clipped": np.concatenate(fracs),
          "threshold": np.concatenate(thresholds)}


def poisson_batch(key, x, y, q):
  """A Poisson sample (each example kept with probability ``q``), padded.

  The batch has the fixed shape ``CAPACITY``; ``mask`` marks the sampled
  examples, the rest is padding. A sample larger than ``CAPACITY`` (more
  than 5.6 standard deviations above the mean, for q * n = 128) would be
  truncated.
  """
  sampled = jax.random.bernoulli(key, q, (len(x),))
  idx = jnp.nonzero(sampled, size=CAPACITY, fill_value=0)[0]
  mask = jnp.arange(CAPACITY) < jnp.sum(sampled)
  return x[idx], y[idx], mask


def epsilon(noise_multiplier: float, q: float, steps: int) -> float | None:
  """Epsilon at DELTA from dp-accounting's RDP accountant; None without it."""
  if noise_multiplier == 0:
    return float("inf")
  try:
    import dp_accounting
  except ImportError:
    return None
  logging.getLogger("absl").setLevel(logging.ERROR)  # Its solver's notes.
  event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          q, dp_accounting.GaussianDpEvent(noise_multiplier)), steps)
  accountant = dp_accounting.rdp.RdpAccountant()
  return accountant.compose(event).get_epsilon(DELTA)


def load(seed=0):
  digits = load_digits()
  x = np.asarray(digits.data, np.float32) / 16.0
  y = np.asarray(digits.target, np.int32)
  order = np.random.default_rng(seed).permutation(len(x))
  x, y = x[order], y[order]
  split = int(0.8 * len(x))
  return tuple(jnp.asarray(a) for a in (x[:split], y[:split], x[split:],
                                        y[split:]))


def plot(results, steps):
  plt = _common.plt
  fig, (ax_acc, ax_eps) = plt.subplots(1, 2, figsize=(11, 4.2))
  x = np.arange(1, len(next(iter(results.values()))["accuracy"]) + 1) * CHUNK
  for label, r in results.items():
    ax_acc.plot(x, r["accuracy"], label=label, lw=1.5)
  ax_acc.set(xlabel="step", ylabel="test accuracy", ylim=(0, 1),
             title=f"DP-SGD on digits ({steps} steps, expected batch"
             f" {EXPECTED_BATCH})")
  ax_acc.legend(fontsize=8)
  pts = [(r["epsilon"], r["accuracy"][-1], label) for label, r in
         results.items() if r["epsilon"] is not None
         and np.isfinite(r["epsilon"])]
  fixed = sorted(p for p in pts if "adaptive" not in p[2])
  if fixed:
    ax_eps.plot([p[0] for p in fixed], [p[1] for p in fixed], "o-",
                label="fixed max_norm")
  for e, a, label in pts:
    if "adaptive" in label:
      ax_eps.plot([e], [a], "s", color="C3", label=label)
  if pts:
    for e, a, label in pts:
      ax_eps.annotate(label, (e, a), fontsize=7, xytext=(4, -10),
                      textcoords="offset points")
  base = results["non-private"]["accuracy"][-1]
  ax_eps.axhline(base, color="k", ls=":", label="non-private")
  ax_eps.set_xscale("log")
  ax_eps.xaxis.set_minor_formatter(_common.plt.NullFormatter())
  ax_eps.set(xlabel=f"epsilon at delta={DELTA:g} (RDP)",
             ylabel="final test accuracy", title="Accuracy against privacy")
  ax_eps.legend(fontsize=8)
  fig.tight_layout()
  _common.save(fig, "dp_sgd")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true",
                      help="a quick smoke test: fewer steps and runs")
  args = parser.parse_args()
  args.steps = 75 if args.small else 500
  noise = (0.0, 1.0) if args.small else (0.0, 0.6, 1.0, 2.0, 4.0)
  data = load()
  q = EXPECTED_BATCH / len(data[0])
  runs = {"non-private": (0.0, float("inf"))}
  runs.update({f"sigma={z:g}": (z, MAX_NORM) for z in noise if z > 0})
  runs["sigma=1 adaptive"] = (1.0, oc.quantile_norm(
      MAX_NORM, target_quantile=0.5, learning_rate=0.2,
      count_noise_multiplier=10.0))
  results = {}
  for label, (z, max_norm) in runs.items():
    start = time.perf_counter()
    r = train(z, max_norm, data, args)
    r["epsilon"] = epsilon(z, q, args.steps)
    r["seconds"] = time.perf_counter() - start
    r["noise"] = z
    results[label] = r
  print(f"{len(data[0])} training images, Poisson rate q={q:.4f} (expected"
        f" batch {EXPECTED_BATCH}), {args.steps} steps, max_norm={MAX_NORM:g},"
        f" delta={DELTA:g}")
  if any(r["epsilon"] is None for r in results.values()):
    print("epsilon: dp-accounting is not installed (pip install"
          " dp-accounting); shown as n/a")
  rows = []
  for label, r in results.items():
    eps = "n/a" if r["epsilon"] is None else r["epsilon"]
    rows.append([label, r["noise"], eps, r["accuracy"][-1],
                 float(np.mean(r["frac_clipped"][-CHUNK:])),
                 float(r["threshold"][-1]), r["seconds"]])
  _common.print_table(["run", "noise multiplier", "epsilon", "test accuracy",
                       "frac clipped", "threshold", "seconds"], rows)
  plot(results, args.steps)


if __name__ == "__main__":
  main()
