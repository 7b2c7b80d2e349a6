"""A Flax linen language model trained with gradient accumulation
(``optax.MultiSteps``) behind the step guard, reading MultiSteps' counters.

A small causal transformer (linen: token and position embeddings, one
pre-norm attention + MLP block, a linear head) learns the characters of
Python's help topics (``pydoc_data.topics``, ships with Python). The
optimizer is the one a job with gradient accumulation has, guarded::

  oc.skip_step(optax.MultiSteps(
      optax.chain(oc.clip_by_global_norm(1.0), optax.adamw(3e-3)), K))

The train step reads MultiSteps' own counters through the guard's state,
as code written for a bare MultiSteps does: ``opt_state.gradient_step``,
``opt_state.mini_step`` and ``optax.MultiSteps.has_updated(opt_state)``.
Two runs: one whose micro-batch stream holds a NaN micro-batch, and the
same stream without it. The guard drops the bad micro-batch alone
(MultiSteps' accumulator and counters stay as they were), so both runs end
with the same parameters, bit for bit.

Run from the repository root::

  python examples/lm_multisteps.py              # 160 micro-batches
  python examples/lm_multisteps.py --micro 40   # smoke test
"""

from __future__ import annotations

import argparse
import time

import _chars
import _common
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optaxclip as oc

DIM, HEADS, SEQ, MICRO_BATCH, K = 32, 4, 32, 8, 4
LEARNING_RATE = 3e-3


class LM(nn.Module):
  vocab: int

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab, DIM, name="embed")(tokens)
    x = x + self.param("pos", nn.initializers.normal(0.02), (SEQ, DIM))
    y = nn.LayerNorm()(x)
    x = x + nn.SelfAttention(num_heads=HEADS)(
        y, mask=nn.make_causal_mask(tokens))
    y = nn.Dense(4 * DIM)(nn.LayerNorm()(x))
    x = x + nn.Dense(DIM)(nn.gelu(y))
    return nn.Dense(self.vocab, name="head")(nn.LayerNorm()(x))


def make_optimizer():
  """The guarded optimizer, and the MultiSteps it wraps."""
  multi = optax.MultiSteps(
      optax.chain(oc.clip_by_global_norm(1.0), optax.adamw(LEARNING_RATE)),
      every_k_schedule=K)
  return oc.skip_step(multi), multi


def micro_batches(data, n, seed=0):
  rng = np.random.default_rng(seed)
  starts = rng.integers(0, len(data) - SEQ - 1, (n, MICRO_BATCH))
  windows = data[starts[..., None] + np.arange(SEQ + 1)]
  return jnp.asarray(windows[..., :-1]), jnp.asarray(windows[..., 1:])


def make_step(model, opt, multi):
  def loss_fn(params, x, y, bad):
    logits = model.apply({"params": params}, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss * jnp.where(bad, jnp.nan, 1.0)

  @jax.jit
  def step(params, opt_state, x, y, bad):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y, bad)
    updates, opt_state = opt.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    # MultiSteps' counters, read through skip_step's state as from a bare
    # MultiSteps: no .inner_state needed.
    log = {"loss": loss, "gradient_step": opt_state.gradient_step,
           "mini_step": opt_state.mini_step,
           "updated": multi.has_updated(opt_state),
           "skipped": opt_state.skipped}
    return params, opt_state, log

  return step


def train(step, params, opt_state, xs, ys, bad):
  logs = []
  for i in range(xs.shape[0]):
    params, opt_state, log = step(params, opt_state, xs[i], ys[i],
                                  jnp.bool_(i == bad))
    logs.append(log)
  logs = jax.device_get(logs)
  return params, opt_state, {k: np.array([g[k] for g in logs])
                             for k in logs[0]}


def plot(results):
  plt = _common.plt
  fig, ax = plt.subplots(figsize=(8, 4))
  for (label, r), color in zip(results.items(), ["C3", "C0"]):
    log = r["log"]
    ok = np.isfinite(log["loss"])
    ax.plot(np.flatnonzero(ok), log["loss"][ok], color=color, lw=0.8,
            label=label)
    skipped = np.flatnonzero(log["skipped"])
    ax.plot(skipped, np.full(len(skipped), np.nanmax(log["loss"])), "x",
            color=color, ms=9, label=f"{label}: skipped micro-batch")
  ax.set(xlabel="micro-batch", ylabel="training loss (nats per character)",
         title=f"linen LM, MultiSteps(k={K}) behind skip_step")
  ax.legend()
  fig.tight_layout()
  _common.save(fig, "lm_multisteps")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--micro", type=int, default=160,
                      help="micro-batches in the clean stream")
  args = parser.parse_args()
  data, vocab = _chars.load_text()
  model = LM(vocab)
  params = jax.jit(model.init)(jax.random.key(0),
                               jnp.zeros((1, SEQ), jnp.int32))["params"]
  opt, multi = make_optimizer()
  step = make_step(model, opt, multi)
  xs, ys = micro_batches(data, args.micro)
  bad = args.micro // 2 + 1  # Inside an accumulation window.
  # The same stream with a NaN micro-batch inserted before micro-batch bad.
  xs_bad = jnp.concatenate([xs[:bad], xs[bad - 1:bad], xs[bad:]])
  ys_bad = jnp.concatenate([ys[:bad], ys[bad - 1:bad], ys[bad:]])
  results, rows = {}, []
  for label, x, y, planted in (("clean stream", xs, ys, -1),
                               ("with a NaN micro-batch", xs_bad, ys_bad,
                                bad)):
    start = time.perf_counter()
    p, state, log = train(step, params, opt.init(params), x, y, planted)
    results[label] = {"params": p, "log": log}
    rows.append([label, str(x.shape[0]), str(int(state.gradient_step)),
                 str(int(state.mini_step)), str(int(state.num_skipped)),
                 float(np.nanmean(log["loss"][-20:])),
                 time.perf_counter() - start])
  same = all(np.asarray(a).tobytes() == np.asarray(b).tobytes()
             for a, b in zip(*(jax.tree_util.tree_leaves(r["params"])
                               for r in results.values())))
  rows[0].append("-")
  rows[1].append(str(same))
  print(f"linen LM, micro-batches of {MICRO_BATCH} x {SEQ} characters,"
        f" MultiSteps(k={K}) behind skip_step; NaN micro-batch at"
        f" {bad} of the second stream:")
  _common.print_table(["run", "micro-batches", "gradient_step", "mini_step",
                       "skipped", "train loss (last 20 micro-batches)",
                       "seconds", "same parameters"], rows)
  plot(results)


if __name__ == "__main__":
  main()
