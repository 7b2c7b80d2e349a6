"""Spike mitigation compared: a character-level transformer, planted spikes.

A small decoder-only transformer (Flax NNX) learns to predict the next
character of the text of Python's own help topics (``pydoc_data.topics``,
about 465,000 characters, shipped with Python: no download), with AdamW at a
learning rate high enough for the loss to jump now and then on its own. On
top of that, spikes are planted at fixed steps:

- *scaled* batches (at 20%, 40% and 60% of the run): the labels are shifted
  to wrong characters and the loss is multiplied by 1000, so the gradient is
  about a thousand times too long and points the wrong way;
- one *corrupted* batch (at 80%): inputs and labels are random characters,
  loss multiplied by 100.

The same runs (same initialisations, batches and spikes per seed) are
trained with every spike-mitigation transform of optaxclip:

- no clipping; ``clip_by_global_norm(1.0)``;
- AutoClip in its two published forms, ``clip_by_quantile(0.9)`` (the
  paper's code) and ``clip_by_quantile(0.9, include_current=False)`` (the
  ``autoclip`` package's ``QuantileClip``);
- ``zclip()``; ``adagc()``; ``spike_clipped(adamw)`` (SPAM's rule, read
  against AdamW's own second moment);
- ``skip_step`` (``rule=SpikeEMA(max_ratio=5)``) around whichever of those
  ends with the lowest validation loss.

All seeds of one row train at once (``jax.vmap`` over the seed); the model's
gradient is compiled once for every row, each row compiles only its
optimizer step. Every statistic is read from the transforms' own states. Columns
of the table (mean over seeds, and the spread as ``min-max`` where it
matters):

- *val loss*: the cross-entropy (nats per character) on 256 held-out windows
  at the end;
- *loss spikes*: the steps whose clean training loss exceeds 1.25 times the
  mean of the 20 steps before it (a spike score in the spirit of AdaGC's: a
  jump above the running mean), counted per run;
- *clipped* and *skipped*: steps on which the transform scaled something
  down (any tensor, any element) or that ``skip_step`` dropped;
- *ms/step*: wall time per training step per seed, compilation excluded.

The script prints the table and saves ``examples/output/loss_spikes.png``:
the loss curves (mean over seeds), the pre-clip norm with each global
threshold over it, and what AdaGC and spike clipping clipped, per step.

Run from the repository root::

  python examples/loss_spikes.py          # 3 seeds, ~5 minutes on 2 cores
  python examples/loss_spikes.py --small  # smoke test
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import _common
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _chars import CharTransformer, find, load_text
from flax import nnx

import optaxclip as oc

SCALED_AT = (0.2, 0.4, 0.6)  # Scaled, wrong-label batches (fraction of run).
CORRUPT_AT = (0.8,)  # Random-character batches.
SCALED_LOSS, CORRUPT_LOSS = 1000.0, 100.0
LEARNING_RATE = 1e-2
SPIKE_RATIO, SPIKE_WINDOW = 1.25, 20
SKIP_RATIO = 5.0  # skip_step's SpikeEMA(max_ratio=...).

ADAGC_WARMUP = 100  # Its default; --small runs 100 steps in all and uses 15.

Factory = Callable[[optax.GradientTransformation], optax.GradientTransformation]


def rows() -> dict[str, Factory]:
  """Each row: how it wraps AdamW."""
  return {
      "no clipping": lambda adamw: adamw,
      "clip_by_global_norm(1.0)": lambda adamw: optax.chain(
          oc.clip_by_global_norm(1.0), adamw),
      "AutoClip, paper": lambda adamw: optax.chain(
          oc.clip_by_quantile(0.9), adamw),
      "AutoClip, package": lambda adamw: optax.chain(
          oc.clip_by_quantile(0.9, include_current=False), adamw),
      "zclip()": lambda adamw: optax.chain(oc.zclip(), adamw),
      "adagc()": lambda adamw: optax.chain(
          oc.adagc(warmup_steps=ADAGC_WARMUP), adamw),
      "spike_clipped(adamw)": lambda adamw: oc.spike_clipped(adamw),
  }


def adamw() -> optax.GradientTransformation:
  return optax.adamw(LEARNING_RATE, b1=0.9, b2=0.95, weight_decay=1e-4)


# The text and the batches.


def make_data(args, ids: np.ndarray, vocab: int):
  """Per seed: the batches, with the planted ones, and held-out windows."""
  split = int(0.9 * len(ids))
  train_ids, test_ids = ids[:split], ids[split:]
  window = args.length + 1
  batches = []
  for seed in range(args.seeds):
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(train_ids) - window, (args.steps, args.batch))
    b = train_ids[starts[..., None] + np.arange(window)]
    for s in corrupt_steps(args.steps):
      b[s] = rng.integers(0, vocab, b[s].shape)
    batches.append(b)
  rng = np.random.default_rng(1234)
  test_starts = rng.integers(0, len(test_ids) - window, 256)
  heldout = test_ids[test_starts[:, None] + np.arange(window)]
  factor = np.ones(args.steps, np.float32)
  wrong = np.zeros(args.steps, bool)
  factor[scaled_steps(args.steps)] = SCALED_LOSS
  wrong[scaled_steps(args.steps)] = True
  factor[corrupt_steps(args.steps)] = CORRUPT_LOSS
  return (jnp.asarray(np.stack(batches)), jnp.asarray(factor),
          jnp.asarray(wrong), jnp.asarray(heldout))


def scaled_steps(steps: int) -> list[int]:
  return [int(f * steps) for f in SCALED_AT]


def corrupt_steps(steps: int) -> list[int]:
  return [int(f * steps) for f in CORRUPT_AT]


def cross_entropy(graphdef, params, tokens, labels):
  logits = nnx.merge(graphdef, params)(tokens)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# Training. The model's forward and backward pass is compiled once for all
# rows; each row compiles only its optimizer step. Seeds train side by side
# (jax.vmap), so every step trains every seed.


class Model:
  """The model's loss and gradient, and the held-out loss, for all seeds."""

  def __init__(self, args, vocab: int, heldout: jax.Array):
    self.args, self.vocab = args, vocab
    self.graphdef = nnx.graphdef(self.fresh(0))
    self.grad = jax.jit(jax.vmap(self._grad, in_axes=(0, 0, None, None, None)))
    self.evaluate = jax.jit(jax.vmap(
        lambda p: cross_entropy(self.graphdef, p, heldout[:, :-1],
                                heldout[:, 1:])))

  def fresh(self, seed: int) -> CharTransformer:
    a = self.args
    return CharTransformer(self.vocab, a.length, a.dim, a.heads, a.layers,
                           nnx.Rngs(seed))

  def init(self) -> Any:
    """The parameters of every seed, stacked along a leading axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs),
                        *[nnx.state(self.fresh(s))
                          for s in range(self.args.seeds)])

  def _grad(self, params, batches, t, factor, wrong):
    """Gradient of the (planted) loss at step ``t``, and the clean loss."""
    batch = batches[t]
    tokens, labels = batch[:, :-1], batch[:, 1:]

    def loss_fn(params):
      clean = cross_entropy(self.graphdef, params, tokens, labels)
      shifted = (labels + 1 + labels % 7) % self.vocab
      target = cross_entropy(self.graphdef, params, tokens, shifted)
      return factor[t] * jnp.where(wrong[t], target, clean), clean

    return jax.grad(loss_fn, has_aux=True)(params)


def make_step(tx: optax.GradientTransformation):
  """One optimizer step for all seeds, jitted, with the statistics."""

  def step(grads, opt_state, params):
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state,
            read_stats(opt_state, grads))

  return jax.jit(jax.vmap(step), donate_argnums=(1, 2))


def read_stats(opt_state: Any, grads: Any) -> dict[str, jax.Array]:
  """Per step: pre-clip norm, global threshold, clipped, skipped, and more."""
  inf, false = jnp.full((), jnp.inf), jnp.zeros((), bool)
  out = {"norm": oc.global_norm(grads), "threshold": inf, "clipped": false,
         "skipped": false, "frac_tensors": jnp.zeros(()),
         "spikes": jnp.zeros((), jnp.int32)}
  guard = find(opt_state, oc.SkipStepState)
  if guard is not None:
    out["skipped"] = guard.skipped
  for kind in (oc.ClipByGlobalNormState, oc.ClipByQuantileState,
               oc.ZClipState):
    s = find(opt_state, kind)
    if s is not None:
      out["threshold"], out["clipped"] = s.stats.threshold, s.stats.clipped
  s = find(opt_state, oc.AdaGCState)
  if s is not None:
    out["clipped"], out["frac_tensors"] = s.stats.clipped, s.stats.frac_clipped
  s = find(opt_state, oc.SpikeClippedState)
  if s is not None:
    out["clipped"], out["spikes"] = s.stats.clipped, s.num_spikes
  return out


def train(factory: Factory, model: Model, data) -> dict[str, Any]:
  """Trains every seed with ``factory(adamw())``; losses and statistics."""
  batches, factor, wrong, _ = data
  tx = factory(adamw())
  params = model.init()
  opt_state = jax.jit(jax.vmap(tx.init))(params)
  step = make_step(tx)
  steps = len(factor)
  losses, stats = [], []
  for t in range(steps):
    if t == 1:  # Step 0 compiled the optimizer step: time from here on.
      jax.block_until_ready(params)
      start = time.perf_counter()
    grads, clean = model.grad(params, batches, np.int32(t), factor, wrong)
    params, opt_state, s = step(grads, opt_state, params)
    losses.append(clean)
    stats.append(s)
  jax.block_until_ready(params)
  seconds = time.perf_counter() - start
  seeds = model.args.seeds
  losses, stats = jax.device_get((jnp.stack(losses, axis=1), jax.tree.map(
      lambda *xs: jnp.stack(xs, axis=1), *stats)))
  return {"loss": np.asarray(losses), "val": np.asarray(
      model.evaluate(params)),
          "ms_per_step": 1e3 * seconds / ((steps - 1) * seeds), **stats}


def loss_spikes(loss: np.ndarray) -> int:
  """Steps whose loss exceeds SPIKE_RATIO x the mean of the SPIKE_WINDOW before.

  The loss of a random-character batch says nothing about the model: it is
  replaced by the loss of the step before.
  """
  loss = loss.copy()
  for s in corrupt_steps(len(loss)):
    loss[s] = loss[s - 1]
  c = np.cumsum(np.r_[0.0, loss])
  w = SPIKE_WINDOW
  mean = (c[w:-1] - c[:-w - 1]) / w  # mean of loss[t-w:t] for t = w..n-1
  return int(np.sum(loss[w:] > SPIKE_RATIO * mean))


def summarize(label: str, r: dict[str, Any]) -> list[Any]:
  spikes = [loss_spikes(x) for x in r["loss"]]
  clipped = r["clipped"].sum(axis=1)
  skipped = r["skipped"].sum(axis=1)
  return [label, f"{r['val'].mean():.3f} ({r['val'].min():.3f}-"
          f"{r['val'].max():.3f})",
          f"{np.mean(spikes):.1f} ({min(spikes)}-{max(spikes)})",
          f"{clipped.mean():.1f}", f"{skipped.mean():.1f}",
          f"{r['ms_per_step']:.2f}"]


def plot(results: dict[str, dict], steps: int) -> None:
  plt = _common.plt
  fig, (ax_loss, ax_norm, ax_frac) = plt.subplots(
      3, 1, figsize=(11, 11), sharex=True,
      gridspec_kw={"height_ratios": [3, 3, 1.6]})
  x = np.arange(1, steps + 1)
  colors = {label: f"C{i}" for i, label in enumerate(results)}
  for ax in (ax_loss, ax_norm, ax_frac):
    for s in scaled_steps(steps):
      ax.axvline(s + 1, color="k", ls=":", lw=0.8, alpha=0.5)
    for s in corrupt_steps(steps):
      ax.axvline(s + 1, color="m", ls=":", lw=0.8, alpha=0.6)
  for label, r in results.items():
    loss = r["loss"].mean(axis=0)
    for s in corrupt_steps(steps):  # Its loss is the random batch's.
      loss[s] = loss[s - 1]
    ax_loss.plot(x, smooth(loss), color=colors[label],
                 label=f"{label}: val {r['val'].mean():.3f}", lw=1.3)
  ax_loss.set(yscale="log", ylabel="clean training loss (nats/char)",
              title="Loss, mean over seeds (smoothed); dotted: planted spikes"
              " (black: scaled x1000, magenta: random characters x100)")
  ax_loss.legend(fontsize=8, ncol=2)

  for label in ("clip_by_global_norm(1.0)", "AutoClip, paper",
                "AutoClip, package", "zclip()"):
    r = results[label]
    ax_norm.plot(x, r["norm"][0], color=colors[label], lw=0.5, alpha=0.6)
    ax_norm.plot(x, r["threshold"][0], color=colors[label], lw=1.5, ls="--",
                 label=f"{label}: threshold")
  ax_norm.set(yscale="log", ylabel="global norm before clipping",
              title="Seed 0: pre-clip norm (thin) and each run's threshold"
              " (dashed), read from the clipper's state")
  ax_norm.legend(fontsize=8, ncol=2)

  r = results["adagc()"]
  ax_frac.plot(x, r["frac_tensors"][0], color=colors["adagc()"], lw=0.8,
               label="adagc: fraction of tensors clipped (left)")
  ax_frac.set(xlabel="step", ylabel="fraction (seed 0)", ylim=(0, 1.05))
  ax_spikes = ax_frac.twinx()
  r = results["spike_clipped(adamw)"]
  ax_spikes.plot(x, np.maximum(r["spikes"][0], 0.5),
                 color=colors["spike_clipped(adamw)"], lw=0.8,
                 label="spike_clipped: elements clipped (right)")
  ax_spikes.set(yscale="log", ylabel="elements", ylim=(0.7, None))
  ax_frac.legend(loc="upper left", fontsize=8)
  ax_spikes.legend(loc="upper right", fontsize=8)
  fig.tight_layout()
  _common.save(fig, "loss_spikes")


def smooth(y: np.ndarray, width: int = 10) -> np.ndarray:
  """A trailing moving average (shorter at the start)."""
  c = np.cumsum(np.r_[0.0, y])
  n = np.minimum(np.arange(1, len(y) + 1), width)
  idx = np.arange(1, len(y) + 1)
  return (c[idx] - c[idx - n]) / n


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=None,
                      help="training steps (default 500, or 100 with --small)")
  parser.add_argument("--seeds", type=int, default=None,
                      help="seeds per row (default 3, or 2 with --small)")
  parser.add_argument("--small", action="store_true",
                      help="a quick smoke test: fewer steps, a smaller model")
  args = parser.parse_args()
  args.batch, args.length, args.dim, args.heads, args.layers = 16, 64, 48, 4, 2
  if args.small:
    args.batch, args.length, args.dim, args.heads, args.layers = (
        8, 32, 32, 2, 1)
  args.steps = args.steps or (100 if args.small else 500)
  args.seeds = args.seeds or (2 if args.small else 3)
  if args.small:
    global ADAGC_WARMUP
    ADAGC_WARMUP = 15
  ids, vocab = load_text()
  data = make_data(args, ids, vocab)
  total = time.perf_counter()
  model = Model(args, vocab, data[-1])
  results = {}
  for label, f in rows().items():
    results[label] = train(f, model, data)
    print(f"  {label}: done at {time.perf_counter() - total:.0f} s",
          file=sys.stderr, flush=True)
  best = min((label for label in results if label != "no clipping"),
             key=lambda label: results[label]["val"].mean())
  guarded = f"skip_step({best})"
  results[guarded] = train(
      lambda a: oc.skip_step(rows()[best](a),
                             rule=oc.SpikeEMA(max_ratio=SKIP_RATIO)),
      model, data)

  print(f"{args.steps} steps of AdamW({LEARNING_RATE:g}, b2=0.95) on"
        f" pydoc_data.topics, {args.seeds} seeds, batch {args.batch} x"
        f" {args.length} characters, model dim {args.dim} x {args.layers}"
        f" layers; scaled spikes at steps"
        f" {[s + 1 for s in scaled_steps(args.steps)]}, corrupted batch at"
        f" {[s + 1 for s in corrupt_steps(args.steps)]}:")
  _common.print_table(
      ["run", "val loss (min-max)", "loss spikes (min-max)", "steps clipped",
       "steps skipped", "ms/step"],
      [summarize(label, r) for label, r in results.items()])
  print(f"total {time.perf_counter() - total:.0f} s, compilation included")
  plot(results, args.steps)


if __name__ == "__main__":
  main()
