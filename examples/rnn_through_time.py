"""Why recurrent gradients explode, and what clipping does about it.

Part 1, a vanilla linear RNN ``h_t = W h_{t-1} + U x_t`` read out at the last
step: the gradient reaching ``h_t`` is ``(W^T)^(T-t)`` times the readout, so
its norm grows geometrically, by about the spectral radius of ``W`` per step
back in time. Clipping the gradient by its global norm at every step of the
backward pass (Mikolov 2012; Pascanu et al. 2013), here with
``oc.clip_by_global_norm`` inside a ``jax.custom_vjp``, keeps it bounded.

Part 2, a Flax NNX LSTM on the adding problem (sum the two marked numbers of
a long sequence), trained with SGD at a learning rate of 1.0 with momentum
0.9: without clipping the loss overflows to NaN within a few dozen steps; with
``oc.clip_by_global_norm(1.0)`` in the chain the same run learns the task.

Run from the repository root::

  python examples/rnn_through_time.py          # full size
  python examples/rnn_through_time.py --small  # smoke test
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

RNN_HIDDEN, RNN_STEPS, SPECTRAL_RADIUS = 32, 100, 1.2
MAX_NORM = 1.0
CHUNK = 50  # Training steps per jitted call.


# Part 1: the gradient of a vanilla RNN, time step by time step.


def clip_cotangent(max_norm: float):
  """The identity, whose gradient is clipped to global norm ``max_norm``."""
  clip = oc.clip_by_global_norm(max_norm)

  @jax.custom_vjp
  def identity(h):
    return h

  def backward(_, g):
    g, _ = clip.update(g, clip.init(g))
    return (g,)

  identity.defvjp(lambda h: (h, None), backward)
  return identity


def gradient_per_step(w, u, v, xs, max_norm: float | None) -> jax.Array:
  """The norm of ``dL/dh_t`` for every ``t``, with ``L = v . h_T``.

  ``h_t = clip(W h_{t-1} + U x_t) + e_t`` with ``e_t = 0``: the gradient with
  respect to ``e_t`` is the gradient reaching ``h_t`` before ``clip`` (the
  identity, whose backward pass clips) acts on it.
  """
  clip = (lambda h: h) if max_norm is None else clip_cotangent(max_norm)

  def loss(eps):
    def step(h, inputs):
      x, e = inputs
      h = clip(w @ h + u @ x) + e
      return h, None

    h, _ = jax.lax.scan(step, jnp.zeros(w.shape[0]), (xs, eps))
    return v @ h

  grads = jax.grad(loss)(jnp.zeros((xs.shape[0], w.shape[0])))
  return jnp.linalg.norm(grads, axis=1)


def rnn_part() -> dict[str, np.ndarray]:
  kw, ku, kv, kx = jax.random.split(jax.random.key(0), 4)
  w = jax.random.normal(kw, (RNN_HIDDEN, RNN_HIDDEN))
  w = w * SPECTRAL_RADIUS / np.max(np.abs(np.linalg.eigvals(np.asarray(w))))
  u = jax.random.normal(ku, (RNN_HIDDEN, 4)) / 2
  v = jax.random.normal(kv, (RNN_HIDDEN,)) / np.sqrt(RNN_HIDDEN)
  xs = jax.random.normal(kx, (RNN_STEPS, 4))
  return {"none": np.asarray(gradient_per_step(w, u, v, xs, None)),
          f"clip_by_global_norm({MAX_NORM})":
              np.asarray(gradient_per_step(w, u, v, xs, MAX_NORM))}


# Part 2: an LSTM on the adding problem, with and without clipping.


def adding_problem(key, batch: int, length: int):
  """Inputs ``(batch, length, 2)``: a number and a marker; target: marked sum."""
  k_val, k_first, k_second = jax.random.split(key, 3)
  values = jax.random.uniform(k_val, (batch, length))
  first = jax.random.randint(k_first, (batch,), 0, length // 2)
  second = jax.random.randint(k_second, (batch,), length // 2, length)
  marks = jax.nn.one_hot(first, length) + jax.nn.one_hot(second, length)
  return jnp.stack([values, marks], -1), jnp.sum(values * marks, 1)


class LSTMRegressor(nnx.Module):
  def __init__(self, hidden: int, rngs: nnx.Rngs):
    self.rnn = nnx.RNN(nnx.LSTMCell(2, hidden, rngs=rngs))
    self.out = nnx.Linear(hidden, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(self.rnn(x)[:, -1])[:, 0]


def mse(model, x, y):
  return jnp.mean(jnp.square(model(x) - y))


@nnx.jit(static_argnums=(3, 4))
def train_chunk(model, optimizer, key, batch: int, length: int):
  """``CHUNK`` SGD steps on fresh batches; per-step loss and pre-clip norm."""

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0))
  def step(carry, key):
    model, optimizer = carry
    x, y = adding_problem(key, batch, length)
    loss, grads = nnx.value_and_grad(mse)(model, x, y)
    optimizer.update(model, grads)
    norm = oc.global_norm(grads)  # Before clipping.
    return (model, optimizer), (loss, norm)

  _, (losses, norms) = step((model, optimizer), jax.random.split(key, CHUNK))
  return losses, norms


def train_lstm(clipper, steps: int, length: int, hidden: int = 32,
               batch: int = 64) -> dict:
  model = LSTMRegressor(hidden, nnx.Rngs(0))
  sgd = optax.sgd(1.0, momentum=0.9)
  tx = sgd if clipper is None else optax.chain(clipper, sgd)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  losses, norms = [], []
  for key in jax.random.split(jax.random.key(1), steps // CHUNK):
    loss, norm = train_chunk(model, optimizer, key, batch, length)
    losses.append(loss)
    norms.append(norm)
  stats = _common.own_stats(optimizer.opt_state)
  frac = float(stats["num_clipped"]) / float(stats["count"]) if stats else None
  return {"losses": np.concatenate(jax.device_get(losses)),
          "norms": np.concatenate(jax.device_get(norms)), "frac_clipped": frac}


def plot(rnn: dict, lstm: dict, length: int) -> None:
  plt = _common.plt
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  colors = ["C3", "C0"]
  ax = axes[0]
  back = np.arange(RNN_STEPS)  # Steps back from the loss.
  for (label, norms), color in zip(rnn.items(), colors):
    ax.plot(back, norms[::-1], color=color, label=label)
  ax.plot(back, rnn["none"][-1] * SPECTRAL_RADIUS ** back, "k:", lw=1,
          label=f"{SPECTRAL_RADIUS}^k (spectral radius)")
  ax.set(yscale="log", xlabel="k: time steps back from the loss",
         ylabel="|dL/dh| before clipping",
         title=f"Linear RNN, hidden {RNN_HIDDEN}: gradient through time")
  ax.legend()
  top = 1e3
  for (label, r), color in zip(lstm.items(), colors):
    step = np.arange(1, len(r["losses"]) + 1)
    ok = np.isfinite(r["losses"]) & np.isfinite(r["norms"])
    dead = len(ok) if ok.all() else int(np.argmin(ok))
    axes[1].plot(step[:dead], r["losses"][:dead], color=color, lw=0.8,
                 label=label)
    axes[2].plot(step[:dead], r["norms"][:dead], color=color, lw=0.8,
                 label=label)
    if dead < len(ok):
      axes[1].plot([step[dead]], [top], "x", color=color, ms=10, mew=2,
                   clip_on=False)
      axes[1].annotate(f"{label}: NaN from step {dead + 1}", (step[dead], top),
                       textcoords="offset points", xytext=(10, -14),
                       color=color)
      axes[2].plot([step[dead - 1]], [r["norms"][dead - 1]], "x", color=color,
                   ms=10, mew=2)
      axes[2].annotate(f"{label}: {r['norms'][dead - 1]:.1e},\nthen inf/NaN",
                       (step[dead - 1], r["norms"][dead - 1]),
                       textcoords="offset points", xytext=(10, -22),
                       color=color)
  axes[1].axhline(1 / 6, color="gray", ls=":", lw=1)
  axes[1].annotate("MSE of predicting the mean, 1/6", (1, 1 / 6),
                   textcoords="offset points", xytext=(2, -12), color="gray")
  axes[1].set(yscale="log", xscale="log", ylim=(None, top),
              xlabel="training step", ylabel="batch MSE",
              title=f"LSTM on the adding problem (length {length}), SGD lr 1.0")
  axes[1].legend(loc="lower left")
  axes[2].axhline(MAX_NORM, color="gray", ls=":", lw=1)
  axes[2].annotate(f"threshold {MAX_NORM}", (1, MAX_NORM),
                   textcoords="offset points", xytext=(2, 4), color="gray")
  axes[2].set(yscale="log", xscale="log", xlabel="training step",
              ylabel="global gradient norm before clipping",
              title="LSTM gradient norm per step")
  fig.tight_layout()
  _common.save(fig, "rnn_through_time")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true",
                      help="shorter sequences and fewer steps (smoke test)")
  args = parser.parse_args()
  length, steps = (20, 300) if args.small else (50, 1000)

  rnn = rnn_part()
  rows = []
  for label, norms in rnn.items():
    growth = (norms[0] / norms[-1]) ** (1 / (RNN_STEPS - 1))
    rows.append([label, norms[-1], norms[0], float(np.max(norms)), growth])
  print(f"Part 1: linear RNN, hidden {RNN_HIDDEN}, {RNN_STEPS} steps,"
        f" spectral radius {SPECTRAL_RADIUS}; |dL/dh_t| before clipping:")
  _common.print_table(["run", "at last step", "at first step", "max",
                       "growth per step"], rows)

  lstm, rows = {}, []
  for label, clipper in [("none", None), (f"clip_by_global_norm({MAX_NORM})",
                                          oc.clip_by_global_norm(MAX_NORM))]:
    start = time.perf_counter()
    r = lstm[label] = train_lstm(clipper, steps, length)
    tail = r["losses"][-max(steps // 10, 1):]
    frac = "-" if r["frac_clipped"] is None else f"{r['frac_clipped']:.3f}"
    rows.append([label, float(np.mean(tail)), float(np.nanmax(r["norms"])),
                 frac, time.perf_counter() - start])
  print(f"\nPart 2: LSTM on the adding problem, length {length}, {steps} steps of"
        " SGD(1.0, momentum=0.9); predicting the mean gives MSE 0.167:")
  _common.print_table(["run", "final MSE", "max grad norm", "steps clipped",
                       "seconds"], rows)
  plot(rnn, lstm, length)


if __name__ == "__main__":
  main()
