"""Muon's growing attention logits, held by QK-Clip; bad batches skipped.

A small decoder-only transformer (Flax NNX, two layers of
``nnx.MultiHeadAttention``) learns to predict the next character of the text
of Python's own help topics (``pydoc_data.topics``, about 465,000
characters, shipped with Python: no download). Its matrices train with Muon
(``optax.contrib.muon``: the momentum orthogonalised by Newton-Schulz
iterations), everything else (embeddings, the output layer, biases, layer
norms) with the AdamW that ``muon`` runs beside it.

Muon gives each matrix an update of fixed spectral size, whatever the size
of its gradient. At a high learning rate the query and key projections grow
step after step, and with them the pre-softmax logits ``q . k / sqrt(d)``,
which are bilinear in the two: the largest of them, measured every step,
climbs without bound (Kimi K2's "exploding attention logits"). Four runs
with the same initialisation and batches:

(a) ``none``: Muon alone;
(b) ``qk_clip``: the same, guarded: ``clip_by_global_norm(1.0, mask=...)``
    on the AdamW leaves first, then Muon, then ``oc.qk_clip(max_logit)`` as
    the last link (after the update, each head whose largest logit of the
    step exceeded ``max_logit`` has its query and key kernels scaled by
    ``sqrt(max_logit / S_max)`` each);
(c) ``bad batches``: run (b) with a bad batch planted every 50 steps from
    step 100, alternately one whose labels are wrong and whose loss is
    multiplied by 100, and one of random characters; once as it is and once
    wrapped in ``oc.skip_step`` with the rolling loss rule of OLMo-core,
    levanter and MaxText (``rule=oc.SpikeWindow(...)``: a step is skipped
    when its loss lies more than 6 standard deviations above the mean of the
    last 32 losses).

Every step records each head's largest logit through
``oc.max_logit_attention``, an ``attention_fn`` that sows it (``nnx.sow``)
during the loss's own forward pass; ``oc.gather_max_logits`` collects them
for the update. The table
gives, per run: the largest logit at the first step, the last step and over
the run, the clean training loss of the last 20 steps, the held-out loss at
the end, how many steps QK-Clip acted on and how many were skipped (and
how many of those were planted). The figure shows the largest logit, the loss
and the skipped steps against the step.

Run from the repository root::

  python examples/muon_stability.py             # 300 steps, ~4 minutes
  python examples/muon_stability.py --steps 30  # smoke test
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import _common
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _chars import CharTransformer, find, load_text
from flax import nnx

import optaxclip as oc

LEARNING_RATE = 0.1  # Muon's; high enough for the logits to run away.
ADAM_LEARNING_RATE = 3e-3  # The AdamW leaves'.
MAX_LOGIT = 100.0  # QK-Clip's cap on the logits (Kimi K2's value).
PLANT_FROM, PLANT_EVERY = 100, 50  # Planted bad batches: steps 100, 150, ...
SCALED_LOSS = 100.0
SPIKE_WINDOW, SPIKE_STD = 32, 6.0


# What the guards did, read from their states inside the jitted step.


def heads_clipped(opt_state: Any) -> jax.Array:
  """How many heads QK-Clip scaled at the last step (0 without it)."""
  s = find(opt_state, oc.QKClipState)
  return jnp.zeros((), jnp.int32) if s is None else s.num_heads_clipped


def skipped(opt_state: Any) -> jax.Array:
  """Whether the guard skipped the last step (False without a guard)."""
  s = find(opt_state, oc.SkipStepState)
  return jnp.zeros((), bool) if s is None else s.skipped


# The optimizer: Muon for the matrices, AdamW for the rest.


def muon_dims(params: Any) -> Any:
  """Which leaves Muon trains, and how each is read as a matrix.

  ``optax.contrib.muon`` takes every 2-D leaf by default. Here the
  attention kernels are 3-D (``(in, heads, head_dim)`` for the query, key
  and value, ``(heads, head_dim, out)`` for the output) and are read as one
  matrix each; the MLP kernels are matrices already. The embeddings, the
  position table and the output layer go to AdamW, as is usual with Muon.
  """

  def dims(path, _):
    names = [str(getattr(p, "key", getattr(p, "idx", p))) for p in path]
    if "blocks" not in names or names[-1] != "kernel":
      return None
    if names[-2] in ("query", "key", "value"):
      return optax.contrib.MuonDimensionNumbers(0, (1, 2))
    if names[-2] == "out":
      return optax.contrib.MuonDimensionNumbers((0, 1), 2)
    return optax.contrib.MuonDimensionNumbers(0, 1)

  return jax.tree_util.tree_map_with_path(dims, params)


def adamw_leaves(params: Any) -> Any:
  """True for the leaves AdamW trains (those ``muon_dims`` leaves out)."""
  return jax.tree.map(lambda d: d is None, muon_dims(params),
                      is_leaf=lambda d: d is None or isinstance(
                          d, optax.contrib.MuonDimensionNumbers))


def optimizer(kind: str) -> optax.GradientTransformation:
  """``"none"``: Muon alone; ``"guarded"``: clipped, QK-Clip; ``"skip"``."""
  muon = optax.contrib.muon(
      LEARNING_RATE, adam_learning_rate=ADAM_LEARNING_RATE, adam_b2=0.95,
      muon_weight_dimension_numbers=muon_dims)
  if kind == "none":
    # optax.chain hands max_logits= and loss= only to links that take them.
    return optax.chain(muon)
  # The global norm of all the gradients decides the factor; only the AdamW
  # leaves are scaled, Muon's matrices get their gradients as they are.
  guarded = optax.chain(oc.clip_by_global_norm(1.0, mask=adamw_leaves),
                        muon, oc.qk_clip(MAX_LOGIT))
  if kind == "skip":  # The loss arrives as update(..., loss=loss).
    return oc.skip_step(guarded, rule=oc.SpikeWindow(
        window=SPIKE_WINDOW, num_std=SPIKE_STD, watch="loss"))
  return guarded


RUNS = ("none", "qk_clip", "bad batches", "bad batches + skip_step")


# The text and the batches.


def planted(steps: int) -> list[int]:
  return list(range(PLANT_FROM, steps, PLANT_EVERY))


def make_batches(args, ids: np.ndarray, vocab: int):
  """Clean batches, the same ones with bad batches planted, held-out windows."""
  split = int(0.9 * len(ids))
  train, heldout = ids[:split], ids[split:]
  window = args.length + 1
  rng = np.random.default_rng(0)
  starts = rng.integers(0, len(train) - window, (args.steps, args.batch))
  clean = train[starts[..., None] + np.arange(window)]
  bad, factor, wrong = clean.copy(), np.ones(args.steps, np.float32), np.zeros(
      args.steps, bool)
  for i, s in enumerate(planted(args.steps)):
    if i % 2 == 0:  # Wrong labels, loss x 100.
      factor[s], wrong[s] = SCALED_LOSS, True
    else:  # Random characters, inputs and labels.
      bad[s] = rng.integers(0, vocab, bad[s].shape)
  test_starts = rng.integers(0, len(heldout) - window, 256)
  test = heldout[test_starts[:, None] + np.arange(window)]
  return clean, (bad, factor, wrong), test


def cross_entropy(model, tokens, labels):
  logits = model(tokens)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# Training: one jitted step. The loss's forward pass sows the logits; the
# optimizer gets them (QK-Clip) and the loss (the skip rule) as extra
# arguments of its update, which every link of the chain may read.


def make_step(graphdef: Any, tx: optax.GradientTransformation):
  """The jitted train step; the model is ``nnx.merge(graphdef, params)``."""

  def loss_fn(params, batch, factor, wrong):
    model = nnx.merge(graphdef, params)
    tokens, labels = batch[:, :-1], batch[:, 1:]

    def losses(model):  # The planted loss, and the clean one.
      clean = cross_entropy(model, tokens, labels)
      shifted = (labels + 1 + labels % 7) % model.head.out_features
      target = cross_entropy(model, tokens, shifted)
      return factor * jnp.where(wrong, target, clean), clean

    (loss, clean), intermediates = nnx.capture(losses, nnx.Intermediate)(
        model)
    return loss, (clean, intermediates)

  def step(params, opt_state, batch, factor, wrong):
    (loss, (clean, intermediates)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(params, batch, factor, wrong)
    max_logits = oc.gather_max_logits(intermediates)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   max_logits=max_logits, loss=loss)
    return optax.apply_updates(params, updates), opt_state, {
        "loss": clean, "planted_loss": loss,
        "max_logit": jnp.max(jnp.stack(list(max_logits.values()))),
        "heads_clipped": heads_clipped(opt_state),
        "skipped": skipped(opt_state)}

  return jax.jit(step, donate_argnums=(0, 1))


def train(run: str, args, vocab: int, data,
          compiled: dict[str, Any]) -> dict[str, Any]:
  """One run; ``compiled`` keeps the steps of the optimizers seen so far."""
  clean, (bad, factor, wrong), test = data
  graphdef, state = nnx.split(CharTransformer(
      vocab, args.length, args.dim, args.heads, args.layers, nnx.Rngs(0),
      attention_fn=oc.max_logit_attention))
  params = nnx.as_pure(state)  # Arrays, keyed blocks/0/attn/query/kernel.
  kind = "none" if run == "none" else "skip" if "skip" in run else "guarded"
  if kind not in compiled:  # The two guarded runs share their step.
    tx = optimizer(kind)
    compiled[kind] = tx, make_step(graphdef, tx)
  tx, step = compiled[kind]
  opt_state = tx.init(params)
  batches = bad if run.startswith("bad") else clean
  if not run.startswith("bad"):
    factor, wrong = np.ones_like(factor), np.zeros_like(wrong)
  start, stats = time.perf_counter(), []
  for t in range(args.steps):
    params, opt_state, s = step(params, opt_state, jnp.asarray(batches[t]),
                                jnp.asarray(factor[t]), jnp.asarray(wrong[t]))
    stats.append(s)
  out = {k: np.asarray(v) for k, v in jax.device_get(
      jax.tree.map(lambda *xs: jnp.stack(xs), *stats)).items()}
  test = jnp.asarray(test)
  # The attention sows its logits here too: capture (and drop) them.
  evaluate = jax.jit(nnx.capture(cross_entropy, nnx.Intermediate))
  out["val"] = float(evaluate(nnx.merge(graphdef, params), test[:, :-1],
                              test[:, 1:])[0])
  out["seconds"] = time.perf_counter() - start
  return out


# The table and the figure.


def summarize(run: str, r: dict[str, Any], steps: int) -> list[Any]:
  skipped_steps = np.flatnonzero(r["skipped"])
  caught = len(set(skipped_steps) & set(planted(steps)))
  return [run, r["max_logit"][0], r["max_logit"][-1], r["max_logit"].max(),
          r["loss"][-20:].mean(), r["val"],
          int(np.sum(np.asarray(r["heads_clipped"]) > 0)),
          f"{len(skipped_steps)} ({caught})", r["seconds"]]


def plot(results: dict[str, dict], steps: int) -> None:
  plt = _common.plt
  fig, (ax_logit, ax_loss, ax_skip) = plt.subplots(
      3, 1, figsize=(10, 10), sharex=True,
      gridspec_kw={"height_ratios": [3, 3, 1.2]})
  x = np.arange(1, steps + 1)
  for ax in (ax_logit, ax_loss, ax_skip):
    for s in planted(steps):
      ax.axvline(s + 1, color="m", ls=":", lw=0.8, alpha=0.6)
  for i, (run, r) in enumerate(results.items()):
    ax_logit.plot(x, r["max_logit"], color=f"C{i}", lw=1.2, label=run)
    loss = r["loss"].copy()
    if run.startswith("bad"):  # A random batch's loss says nothing of the
      for s in planted(steps)[1::2]:  # model: the step before's is drawn.
        loss[s] = loss[s - 1]
    ax_loss.plot(x, loss, color=f"C{i}", lw=0.8, alpha=0.85,
                 label=f"{run}: val {r['val']:.3f}")
  ax_logit.axhline(MAX_LOGIT, color="k", ls="--", lw=0.8,
                   label=f"max_logit = {MAX_LOGIT:g}")
  ax_logit.set(yscale="log", ylabel="largest logit q.k/sqrt(d)",
               title=f"Muon (lr {LEARNING_RATE:g}): the largest pre-softmax"
               " logit of the step, over both layers and all heads")
  ax_logit.legend(fontsize=8)
  ax_loss.set(yscale="log", ylabel="clean training loss (nats/char)",
              title="Training loss; dotted: planted bad batches (runs c:"
              " wrong labels x100, then random characters)")
  ax_loss.legend(fontsize=8)
  for i, r in enumerate(results.values()):
    s = np.flatnonzero(r["skipped"])
    ax_skip.plot(s + 1, np.full(len(s), i), "|", color=f"C{i}", ms=12, mew=2)
  ax_skip.set(yticks=range(len(results)), yticklabels=list(results),
              ylim=(-0.5, len(results) - 0.5), xlabel="step",
              title="Skipped steps")
  fig.tight_layout()
  _common.save(fig, "muon_stability")


def main() -> None:
  global LEARNING_RATE, MAX_LOGIT, PLANT_FROM
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--runs", default=",".join(RUNS),
                      help="comma-separated subset of: " + ", ".join(RUNS))
  parser.add_argument("--lr", type=float, default=LEARNING_RATE,
                      help="Muon's learning rate")
  parser.add_argument("--max-logit", type=float, default=MAX_LOGIT,
                      help="QK-Clip's cap on the logits")
  parser.add_argument("--plant-from", type=int, default=PLANT_FROM,
                      help="the first planted bad batch (0-based step)")
  args = parser.parse_args()
  args.batch, args.length, args.dim, args.heads, args.layers = 16, 64, 64, 4, 2
  LEARNING_RATE, MAX_LOGIT, PLANT_FROM = args.lr, args.max_logit, args.plant_from
  ids, vocab = load_text()
  data = make_batches(args, ids, vocab)
  total = time.perf_counter()
  compiled: dict[str, Any] = {}
  results = {run: train(run, args, vocab, data, compiled)
             for run in args.runs.split(",")}
  print(f"{args.steps} steps of Muon (lr {LEARNING_RATE:g}; AdamW leaves"
        f" {ADAM_LEARNING_RATE:g}) on pydoc_data.topics, batch {args.batch} x"
        f" {args.length} characters, dim {args.dim}, {args.heads} heads,"
        f" {args.layers} layers; QK-Clip max_logit {MAX_LOGIT:g}; bad batches"
        f" at steps"
        f" {[s + 1 for s in planted(args.steps)]}:")
  _common.print_table(
      ["run", "max logit, step 1", "last step", "max", "train loss (last 20)",
       "val loss", "steps QK-clipped", "skipped (planted)", "seconds"],
      [summarize(run, r, args.steps) for run, r in results.items()])
  print(f"total {time.perf_counter() - total:.0f} s, compilation included")
  plot(results, args.steps)


if __name__ == "__main__":
  main()
