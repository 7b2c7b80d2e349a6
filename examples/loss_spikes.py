"""Loss spikes in a character-level transformer, and five ways to meet them.

A small causal transformer (Flax NNX) learns to predict the next character of
text generated from a toy grammar, with AdamW. On a few chosen steps the batch
is corrupted: its labels are shifted to wrong characters and its loss is
multiplied by 1000, so the gradient points the wrong way and is about a
thousand times too long. Unclipped, one such step throws the weights off and
fills Adam's second moment with a value that shrinks every later step for
hundreds of steps. The same run (same initialisation, same batches, same
spikes) is trained five ways:

- no clipping;
- ``oc.clip_by_global_norm(1.0)``: a fixed threshold;
- ``oc.clip_by_quantile(0.9)``: AutoClip, the 90th percentile of past norms;
- ``oc.zclip()``: ZClip, a z-score test against EMA statistics of the norm;
- ``oc.skip_step(chain(oc.zclip(), adamw), spike_factor=5.0)``: ZClip inside
  the step guard, which drops a step whose norm is more than 5 times the
  moving average of the norms of the steps taken, leaving AdamW's moments and
  ZClip's statistics as they were.

Every statistic (pre-clip norm, threshold, clipped, skipped) is read from
``oc.clip_stats(optimizer.opt_state)`` inside the jitted training loop. The
script prints a table and saves ``examples/output/loss_spikes.png``: the loss
of every run, and the pre-clip norm with each adaptive threshold over it.

Run from the repository root::

  python examples/loss_spikes.py          # full size
  python examples/loss_spikes.py --small  # smoke test
"""

from __future__ import annotations

import argparse
import random
import time

import _common
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optaxclip as oc

SPIKE_AT = (0.2, 0.35, 0.5, 0.65, 0.8)  # Spike steps, as fractions of the run.
SPIKE_SCALE = 1000.0
LEARNING_RATE = 3e-3
CHUNK = 50  # Training steps per jitted call; the step count is rounded up.


def runs() -> dict[str, optax.GradientTransformation]:
  adamw = lambda: optax.adamw(LEARNING_RATE, weight_decay=1e-4)  # noqa: E731
  return {
      "no clipping": adamw(),
      "clip_by_global_norm(1.0)": optax.chain(oc.clip_by_global_norm(1.0),
                                              adamw()),
      "clip_by_quantile(0.9)": optax.chain(oc.clip_by_quantile(0.9), adamw()),
      "zclip()": optax.chain(oc.zclip(), adamw()),
      "skip_step(zclip())": oc.skip_step(optax.chain(oc.zclip(), adamw()),
                                         spike_factor=5.0),
  }


# The text: sentences from a toy grammar, so that there is something to learn.


def make_text(num_chars: int, seed: int = 0) -> str:
  rng = random.Random(seed)
  nouns = ["cat", "dog", "bird", "fox", "owl", "child", "river", "stone",
           "garden", "window", "letter", "lamp"]
  adjectives = ["small", "old", "quiet", "red", "bright", "tired", "cold"]
  verbs = ["sees", "finds", "follows", "likes", "paints", "hides", "carries"]
  places = ["by the door", "under the tree", "in the rain", "at night",
            "near the hill", "on the table"]
  parts = []
  while sum(map(len, parts)) < num_chars:
    subject = f"the {rng.choice(adjectives)} {rng.choice(nouns)}"
    obj = f"a {rng.choice(nouns)}"
    place = f" {rng.choice(places)}" if rng.random() < 0.5 else ""
    parts.append(f"{subject} {rng.choice(verbs)} {obj}{place}. ")
  return "".join(parts)[:num_chars]


# The model: a small pre-norm causal transformer.


class Block(nnx.Module):

  def __init__(self, dim: int, heads: int, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.up = nnx.Linear(dim, 4 * dim, rngs=rngs)
    self.down = nnx.Linear(4 * dim, dim, rngs=rngs)

  def __call__(self, x, mask):
    x = x + self.attn(self.norm1(x), mask=mask)
    return x + self.down(nnx.gelu(self.up(self.norm2(x))))


class CharTransformer(nnx.Module):

  def __init__(self, vocab: int, length: int, dim: int, heads: int,
               layers: int, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, dim, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(),
                                                  (length, dim)))
    self.blocks = nnx.List([Block(dim, heads, rngs) for _ in range(layers)])
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, vocab, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.pos[: tokens.shape[-1]]
    mask = nnx.make_causal_mask(tokens)
    for block in self.blocks:
      x = block(x, mask)
    return self.head(self.norm(x))


def cross_entropy(model, tokens, labels):
  logits = model(tokens)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def loss_fn(model, tokens, labels, spike):
  """The loss to descend (corrupted and scaled on a spike step) and the clean one."""
  clean = cross_entropy(model, tokens, labels)
  vocab = model.embed.num_embeddings
  wrong = cross_entropy(model, tokens, (labels + 1 + labels % 7) % vocab)
  loss = jnp.where(spike, SPIKE_SCALE * wrong, clean)
  return loss, clean


evaluate = nnx.jit(cross_entropy)


# Training: CHUNK steps per jitted call, statistics read from oc.clip_stats.


@nnx.jit
def train_chunk(model, optimizer, batches, spikes):
  @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0))
  def step(carry, batch, spike):
    model, optimizer = carry
    grads, clean = nnx.grad(loss_fn, has_aux=True)(
        model, batch[:, :-1], batch[:, 1:], spike)
    optimizer.update(model, grads)
    return (model, optimizer), (clean, read_stats(optimizer.opt_state, grads))

  _, out = step((model, optimizer), batches, spikes)
  return out


def read_stats(opt_state, grads) -> dict[str, jax.Array]:
  """Pre-clip norm, threshold in force, clipped and skipped, for any run.

  ``oc.clip_stats`` names fields alone when the state holds one optaxclip
  transform, and ``"<transform>/<field>"`` when it holds several.
  """
  stats = oc.clip_stats(opt_state)
  guard = {k[len("skip_step/"):]: v for k, v in stats.items()
           if k.startswith("skip_step/")}
  clip = {k.split("/", 1)[1]: v for k, v in stats.items()
          if "/" in k and not k.startswith("skip_step/")} or stats
  inf, false = jnp.full((), jnp.inf), jnp.zeros((), bool)
  return {
      "norm": guard.get("grad_norm", clip.get("grad_norm",
                                              oc.global_norm(grads))),
      "threshold": clip.get("threshold", inf),
      "clipped": clip.get("clipped", false),
      "skipped": guard.get("skipped", false),
      "skip_threshold": guard.get("threshold", inf),
  }


def train(tx, data, args) -> dict[str, np.ndarray]:
  """Trains a fresh model: same initialisation, batches and spikes every run."""
  vocab, batches, spikes, heldout = data
  model = CharTransformer(vocab, args.length, args.dim, args.heads,
                          args.layers, nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  chunks = [train_chunk(model, optimizer, batches[i:i + CHUNK],
                        spikes[i:i + CHUNK])
            for i in range(0, args.steps, CHUNK)]
  losses, stats = jax.device_get(
      jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *chunks))
  heldout_loss = float(evaluate(model, heldout[:, :-1], heldout[:, 1:]))
  return {"loss": np.asarray(losses), "heldout": heldout_loss,
          **{k: np.asarray(v) for k, v in stats.items()}}


def make_data(args):
  text = make_text(200_000)
  chars = sorted(set(text))
  ids = np.array([chars.index(c) for c in text], np.int32)
  split = int(0.9 * len(ids))
  train_ids, test_ids = ids[:split], ids[split:]
  rng = np.random.default_rng(0)
  window = args.length + 1
  starts = rng.integers(0, len(train_ids) - window, (args.steps, args.batch))
  batches = train_ids[starts[..., None] + np.arange(window)]
  test_starts = rng.integers(0, len(test_ids) - window, 256)
  heldout = test_ids[test_starts[:, None] + np.arange(window)]
  spikes = np.zeros(args.steps, bool)
  spikes[spike_steps(args.steps)] = True
  return len(chars), jnp.asarray(batches), jnp.asarray(spikes), jnp.asarray(
      heldout)


def spike_steps(steps: int) -> list[int]:
  return [int(f * steps) for f in SPIKE_AT]


def plot(results: dict[str, dict], steps: int) -> None:
  """Loss of every run (top); pre-clip norm and thresholds (bottom)."""
  plt = _common.plt
  colors = dict(zip(results, ["C3", "C7", "C0", "C2", "C1"]))
  fig, (ax_loss, ax_norm) = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
  x = np.arange(1, steps + 1)
  for ax in (ax_loss, ax_norm):
    for s in spike_steps(steps):
      ax.axvline(s + 1, color="k", ls=":", lw=0.8, alpha=0.5)
  for label, r in results.items():
    ax_loss.plot(x, smooth(r["loss"]), color=colors[label], label=label,
                 lw=1.4)
  ax_loss.set(yscale="log", ylabel="clean training loss (nats/char, smoothed)",
              title=f"Character transformer with {len(SPIKE_AT)} corrupted"
              f" batches (loss x{SPIKE_SCALE:g}, dotted lines)")
  ax_loss.legend(loc="center right")

  shown = ["clip_by_quantile(0.9)", "zclip()", "skip_step(zclip())"]
  for label in shown:
    r = results[label]
    ax_norm.plot(x, r["norm"], color=colors[label], lw=0.6, alpha=0.7)
    ax_norm.plot(x, r["threshold"], color=colors[label], lw=1.6, ls="--",
                 label=f"{label}: clip threshold")
  r = results["skip_step(zclip())"]
  ok = np.isfinite(r["skip_threshold"])
  ax_norm.plot(x[ok], r["skip_threshold"][ok], color=colors["skip_step(zclip())"],
               lw=1.2, ls="-.", label="skip_step: skip threshold (5 x EMA)")
  ax_norm.axhline(1.0, color=colors["clip_by_global_norm(1.0)"], ls=":",
                  label="clip_by_global_norm: 1.0")
  skipped = r["skipped"]
  ax_norm.plot(x[skipped], r["norm"][skipped], "x", color="k", ms=8,
               label="skipped by skip_step")
  ax_norm.set(yscale="log", ylim=(None, 50 * np.nanmax(r["norm"])),
              xlabel="step",
              ylabel="global gradient norm before clipping",
              title="Pre-clip norm (thin) and thresholds, from oc.clip_stats")
  ax_norm.legend(loc="upper center", ncol=2, fontsize=8)
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
                      help="training steps (default 600, or 200 with --small)")
  parser.add_argument("--small", action="store_true",
                      help="a quick smoke test: fewer steps, a smaller model")
  args = parser.parse_args()
  args.batch, args.length, args.dim, args.heads, args.layers = 32, 64, 64, 4, 2
  if args.small:
    args.batch, args.length, args.dim, args.layers = 16, 32, 32, 1
  args.steps = args.steps or (200 if args.small else 600)
  args.steps = -(-args.steps // CHUNK) * CHUNK
  data = make_data(args)
  results = {}
  for label, tx in runs().items():
    start = time.perf_counter()
    results[label] = train(tx, data, args)
    results[label]["seconds"] = time.perf_counter() - start

  spikes = spike_steps(args.steps)
  tail = max(args.steps // 10, 1)
  rows = []
  for label, r in results.items():
    caught = int(np.sum(r["clipped"][spikes] | r["skipped"][spikes]))
    rows.append([label, float(np.mean(r["loss"][-tail:])), r["heldout"],
                 str(int(r["clipped"].sum())), str(int(r["skipped"].sum())),
                 f"{caught}/{len(spikes)}", r["seconds"]])
  print(f"{args.steps} steps of AdamW({LEARNING_RATE:g}), batch {args.batch}"
        f" x {args.length} characters, spikes at steps"
        f" {[s + 1 for s in spikes]}:")
  _common.print_table(
      ["run", f"final loss (last {tail} steps)", "held-out loss",
       "steps clipped", "steps skipped", "spikes caught", "seconds"], rows)
  plot(results, args.steps)


if __name__ == "__main__":
  main()
