"""The three training tasks of ``python -m benchmarks.stability``.

Each task is plain JAX (a parameter pytree and pure functions), so that one
jitted program can ``jax.vmap`` whole training runs over learning rates and
seeds. The settings are those of the examples they come from:

- ``transformer``: a character-level decoder-only transformer on the text of
  Python's help topics (``pydoc_data.topics``, as ``examples/loss_spikes.py``),
  pre-norm, no QK-layernorm, AdamW(b1=0.9, b2=0.95, weight decay 1e-4) with a
  linear warm-up then cosine decay; its forward pass also returns the largest
  attention logit ``q . k / sqrt(d_head)``, overall and per head (for
  ``oc.qk_clip``);
- ``regression``: the MLP of ``examples/exploding_gradients.py`` (20 -> 25
  ReLU -> 1, He-uniform) on ``make_regression``'s unscaled targets, SGD with
  momentum 0.9, batch 32, shuffled epochs;
- ``lstm``: the LSTM of ``examples/rnn_through_time.py`` (hidden 32) on the
  adding problem of length 50, SGD with momentum 0.9, batch 64, fresh batches.

A task's optimizer has no learning rate: the training loop multiplies its
update by ``-lr * schedule(step)``, with ``lr`` a traced value, so that one
compiled program trains every learning rate of the grid.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

Params = Any
# The key of a loss's aux that holds each attention head's largest logit of
# the batch (a dict from attention module path to an array (heads,)): read by
# the training loop for ``oc.qk_clip``, kept out of the recorded traces.
MAX_LOGITS = "max_logits"
# loss(params, data, key, step) -> (loss, aux), aux a dict of scalars (and,
# for the transformer, MAX_LOGITS).
LossFn = Callable[[Params, Any, jax.Array, jax.Array], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class Task:
  """One training problem: model, data, optimizer and its learning rates.

  Attributes:
    name: short key (``transformer``, ``regression``, ``lstm``).
    title: one line for tables and figures.
    loss_name: what the validation loss is (for the tables).
    init: ``key -> params``.
    loss: the training loss of step ``step`` (its batch drawn from ``key``
      and ``step``), and auxiliary scalars.
    evaluate: ``(params, data) -> (validation loss, aux)``.
    data: arrays the losses read (passed to the jitted program, not closed
      over, so that they are not baked into it as constants).
    optimizer: the task's optimizer with learning rate 1 and no sign flip
      (``optax.scale_by_adam`` ..., not ``optax.adam``).
    schedule: ``(step, steps) -> multiplier`` of the learning rate.
    lrs: the default learning-rate grid; reference_lr: the example's.
    steps: default number of training steps.
    settings: the thresholds of the fixed-threshold clippers on this task.
    margin: how close to the task's best loss a run must end to count as
      good: ``("+", d)``, at most ``best + d``; ``("x", f)``, at most
      ``f * best`` (for losses that span orders of magnitude).
    log_loss: plot the loss on a log axis.
    note: how the task was set up, for the report.
  """

  name: str
  title: str
  loss_name: str
  init: Callable[[jax.Array], Params]
  loss: LossFn
  evaluate: Callable[[Params, Any], tuple[jax.Array, dict]]
  data: Any
  optimizer: Callable[[], optax.GradientTransformation]
  schedule: Callable[[jax.Array, int], jax.Array]
  lrs: tuple[float, ...]
  reference_lr: float
  steps: int
  settings: dict[str, float]
  margin: tuple[str, float]
  log_loss: bool
  note: str


def constant(step: jax.Array, steps: int) -> jax.Array:
  """The examples' schedule: a constant learning rate."""
  del steps
  return jnp.ones((), jnp.float32) + 0 * step


def warmup_cosine(step: jax.Array, steps: int) -> jax.Array:
  """Linear warm-up over the first 10% of steps, then cosine decay to 0."""
  warmup = max(steps // 10, 1)
  t = step.astype(jnp.float32)
  rise = (t + 1) / warmup
  frac = jnp.clip((t - warmup) / max(steps - warmup, 1), 0.0, 1.0)
  return jnp.where(t < warmup, rise, 0.5 * (1 + jnp.cos(math.pi * frac)))


# ---------------------------------------------------------------------------
# A character-level transformer on pydoc_data.topics.


def transformer(*, quick: bool = False, qk_norm: bool = False,
                z_loss: float = 0.0) -> Task:
  """A 2-layer pre-norm causal transformer; AdamW, warm-up then cosine.

  ``qk_norm`` and ``z_loss`` are the two interventions of Wortsman et al.
  (2024) that keep the attention logits and the output logits from
  growing: a LayerNorm (own scale and bias per head dimension, per layer)
  on each head's queries and keys before their product, and
  ``z_loss * log(Z)^2`` added to the training loss, ``log Z`` the
  logsumexp of a position's output logits (PaLM's auxiliary loss, 1e-4
  there). Neither changes the held-out loss that is reported: the z-loss is
  a training term only.
  """
  from pydoc_data.topics import topics
  text = "".join(topics[k] for k in sorted(topics))
  chars = sorted(set(text))
  lookup = {c: i for i, c in enumerate(chars)}
  ids = np.array([lookup[c] for c in text], np.int32)
  vocab = len(chars)
  dim, heads, layers, length, batch = 32, 4, 2, 32, 16
  if quick:
    dim, heads, layers, length, batch = 16, 2, 1, 16, 8
  head_dim = dim // heads
  split = int(0.9 * len(ids))
  rng = np.random.default_rng(1234)
  starts = rng.integers(0, len(ids) - split - length - 1, 32 if quick else 128)
  heldout = ids[split:][starts[:, None] + np.arange(length + 1)]
  data = {"train": jnp.asarray(ids[:split]), "heldout": jnp.asarray(heldout)}

  def init(key):
    keys = iter(jax.random.split(key, 3 + 6 * layers))
    lecun = jax.nn.initializers.lecun_normal()
    proj = jax.nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
    out = jax.nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
    ln = {"scale": jnp.ones(dim), "bias": jnp.zeros(dim)}
    qk = ({"qnorm": {"scale": jnp.ones(head_dim), "bias": jnp.zeros(head_dim)},
           "knorm": {"scale": jnp.ones(head_dim),
                     "bias": jnp.zeros(head_dim)}} if qk_norm else {})
    return {
        "embed": jax.random.normal(next(keys), (vocab, dim)),
        "pos": 0.02 * jax.random.normal(next(keys), (length, dim)),
        "blocks": [{"norm1": dict(ln),
                    "attn": {k: proj(next(keys), (dim, heads, head_dim))
                             for k in "qkv"}
                    | {"o": out(next(keys), (heads, head_dim, dim))},
                    "norm2": dict(ln),
                    "up": lecun(next(keys), (dim, 4 * dim)),
                    "down": lecun(next(keys), (4 * dim, dim))} | qk
                   for _ in range(layers)],
        "norm": dict(ln),
        "head": lecun(next(keys), (dim, vocab)),
    }

  def layer_norm(p, x):
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-6) * p["scale"] + p["bias"]

  causal = np.tril(np.ones((length, length), bool))

  def forward(params, tokens):
    """Logits, the largest attention logit over layers, heads, positions,
    and each head's largest logit, keyed by the path of its attention
    module (``blocks/<i>/attn``, as ``oc.qk_clip``'s ``max_logits``)."""
    x = params["embed"][tokens] + params["pos"]
    top = jnp.full((), -jnp.inf)
    per_head = {}
    for i, b in enumerate(params["blocks"]):
      a, h = b["attn"], layer_norm(b["norm1"], x)
      q = jnp.einsum("btd,dhk->bthk", h, a["q"])
      k = jnp.einsum("btd,dhk->bthk", h, a["k"])
      v = jnp.einsum("btd,dhk->bthk", h, a["v"])
      if qk_norm:
        q, k = layer_norm(b["qnorm"], q), layer_norm(b["knorm"], k)
      logits = jnp.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(head_dim)
      top = jnp.maximum(top, jnp.max(jnp.where(causal, logits, -jnp.inf)))
      per_head[f"blocks/{i}/attn"] = jnp.max(
          jnp.where(causal, logits, -jnp.inf), axis=(0, 2, 3))
      weights = jax.nn.softmax(jnp.where(causal, logits, -1e30), axis=-1)
      out = jnp.einsum("bhqs,bshk->bqhk", weights, v)
      x = x + jnp.einsum("bqhk,hkd->bqd", out, a["o"])
      x = x + jax.nn.gelu(layer_norm(b["norm2"], x) @ b["up"]) @ b["down"]
    x = layer_norm(params["norm"], x)
    return x @ params["head"], top, per_head

  def cross_entropy(params, windows, z=0.0):
    logits, top, per_head = forward(params, windows[:, :-1])
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, windows[:, 1:]).mean()
    if z:
      loss = loss + z * jnp.square(jax.nn.logsumexp(logits, axis=-1)).mean()
    return loss, {"attn_logit_max": top, MAX_LOGITS: per_head}

  def loss(params, data, key, step):
    train = data["train"]
    key = jax.random.fold_in(key, step)
    starts = jax.random.randint(key, (batch,), 0, train.shape[0] - length - 1)
    windows = train[starts[:, None] + jnp.arange(length + 1)]
    return cross_entropy(params, windows, z_loss)

  b2 = 0.95

  def optimizer():
    return optax.chain(optax.scale_by_adam(b1=0.9, b2=b2),
                       optax.add_decayed_weights(1e-4))

  return Task(
      name="transformer",
      title=(f"character-level transformer ({layers} layers, width {dim},"
             f" {heads} heads, {'QK-layernorm' if qk_norm else 'no QK-layernorm'}"
             + (f", z-loss {z_loss:g}" if z_loss else "")
             + "), AdamW(b2=0.95), warm-up + cosine"),
      loss_name="held-out cross-entropy (nats/char)",
      init=init, loss=loss,
      evaluate=lambda params, data: cross_entropy(params, data["heldout"]),
      data=data, optimizer=optimizer, schedule=warmup_cosine,
      lrs=(3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0), reference_lr=1e-2,
      steps=300,
      settings={"clip_by_value": 0.01, "adaptive_grad_clip": 0.01,
                "adam_b2": b2},
      margin=("+", 0.05),
      log_loss=False,
      note=(f"batches of {batch} x {length} characters drawn at random from"
            f" the first 90% of pydoc_data.topics ({len(ids)} characters,"
            f" vocabulary {vocab}); validation on {heldout.shape[0]} windows"
            " of the last 10%; AdamW weight decay 1e-4 (multiplied by the"
            " learning rate, as optax.adamw); warm-up over 10% of the steps,"
            " cosine decay to 0."))


# ---------------------------------------------------------------------------
# The regression MLP of examples/exploding_gradients.py.


def regression(*, quick: bool = False) -> Task:
  """MLP 20 -> 25 -> 1 on make_regression's unscaled targets; SGD + momentum."""
  from sklearn.datasets import make_regression
  x, y = make_regression(n_samples=1000, n_features=20, noise=0.1,
                         random_state=1)
  x, y = x.astype(np.float32), y.astype(np.float32)
  data = {"x": jnp.asarray(x[:500]), "y": jnp.asarray(y[:500]),
          "x_test": jnp.asarray(x[500:]), "y_test": jnp.asarray(y[500:])}
  batch, n = 32, 500
  per_epoch = -(-n // batch)
  he = jax.nn.initializers.he_uniform()

  def init(key):
    k1, k2 = jax.random.split(key)
    return {"hidden": {"kernel": he(k1, (20, 25)), "bias": jnp.zeros(25)},
            "out": {"kernel": he(k2, (25, 1)), "bias": jnp.zeros(1)}}

  def predict(params, x):
    h = jax.nn.relu(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    return (h @ params["out"]["kernel"] + params["out"]["bias"])[:, 0]

  def loss(params, data, key, step):
    """The batch MSE; the last batch of an epoch is padded and masked."""
    epoch, i = step // per_epoch, step % per_epoch
    order = jax.random.permutation(jax.random.fold_in(key, epoch), n)
    order = jnp.concatenate([order, jnp.zeros(per_epoch * batch - n,
                                              order.dtype)])
    idx = jax.lax.dynamic_slice(order, (i * batch,), (batch,))
    weight = (i * batch + jnp.arange(batch) < n).astype(jnp.float32)
    err = jnp.square(predict(params, data["x"][idx]) - data["y"][idx])
    return jnp.sum(weight * err) / jnp.sum(weight), {}

  def evaluate(params, data):
    return jnp.mean(jnp.square(predict(params, data["x_test"])
                               - data["y_test"])), {}

  return Task(
      name="regression",
      title="MLP 20-25-1 on make_regression's unscaled targets, SGD(momentum 0.9)",
      loss_name="test MSE",
      init=init, loss=loss, evaluate=evaluate, data=data,
      optimizer=lambda: optax.trace(0.9), schedule=constant,
      lrs=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
      reference_lr=1e-2, steps=100 * per_epoch,
      settings={"clip_by_value": 5.0, "adaptive_grad_clip": 0.01},
      margin=("x", 2.0),
      log_loss=True,
      note=("make_regression(n_samples=1000, n_features=20, noise=0.1,"
            " random_state=1), first half train, second half test (targets"
            f" in the hundreds); batch {batch}, {per_epoch} steps per"
            " shuffled epoch (the last batch padded and masked)."))


# ---------------------------------------------------------------------------
# The LSTM of examples/rnn_through_time.py on the adding problem.


def adding_problem(key: jax.Array, batch: int, length: int):
  """Inputs ``(batch, length, 2)``: a number and a marker; target: marked sum."""
  k_val, k_first, k_second = jax.random.split(key, 3)
  values = jax.random.uniform(k_val, (batch, length))
  first = jax.random.randint(k_first, (batch,), 0, length // 2)
  second = jax.random.randint(k_second, (batch,), length // 2, length)
  marks = jax.nn.one_hot(first, length) + jax.nn.one_hot(second, length)
  return jnp.stack([values, marks], -1), jnp.sum(values * marks, 1)


def lstm(*, quick: bool = False) -> Task:
  """An LSTM (hidden 32) on the adding problem; SGD with momentum 0.9."""
  hidden, batch, length = 32, 64, 30
  if quick:
    hidden, batch, length = 8, 16, 10
  x_val, y_val = adding_problem(jax.random.key(12345), 512, length)
  data = {"x_val": x_val, "y_val": y_val}
  lecun = jax.nn.initializers.lecun_normal()
  orthogonal = jax.nn.initializers.orthogonal()

  def init(key):
    """As ``nnx.LSTMCell``: lecun-normal input kernels, orthogonal recurrent
    ones (one per gate), zero biases; the four gates side by side."""
    k_in, k_rec, k_out = jax.random.split(key, 3)
    rec = [orthogonal(k, (hidden, hidden))
           for k in jax.random.split(k_rec, 4)]
    return {"cell": {"input": jnp.concatenate(
        [lecun(k, (2, hidden)) for k in jax.random.split(k_in, 4)], 1),
                     "recurrent": jnp.concatenate(rec, 1),
                     "bias": jnp.zeros(4 * hidden)},
            "out": {"kernel": lecun(k_out, (hidden, 1)), "bias": jnp.zeros(1)}}

  def predict(params, x):
    cell = params["cell"]
    xs = jnp.einsum("btd,dg->tbg", x, cell["input"]) + cell["bias"]

    def step(carry, xw):
      c, h = carry
      i, f, g, o = jnp.split(xw + h @ cell["recurrent"], 4, axis=-1)
      c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
      h = jax.nn.sigmoid(o) * jnp.tanh(c)
      return (c, h), None

    zeros = jnp.zeros((x.shape[0], hidden))
    (_, h), _ = jax.lax.scan(step, (zeros, zeros), xs)
    return (h @ params["out"]["kernel"] + params["out"]["bias"])[:, 0]

  def loss(params, data, key, step):
    x, y = adding_problem(jax.random.fold_in(key, step), batch, length)
    return jnp.mean(jnp.square(predict(params, x) - y)), {}

  def evaluate(params, data):
    return jnp.mean(jnp.square(predict(params, data["x_val"])
                               - data["y_val"])), {}

  return Task(
      name="lstm",
      title=(f"LSTM (hidden {hidden}) on the adding problem, length {length},"
             " SGD(momentum 0.9)"),
      loss_name="validation MSE",
      init=init, loss=loss, evaluate=evaluate, data=data,
      optimizer=lambda: optax.trace(0.9), schedule=constant,
      lrs=(0.03, 0.1, 0.3, 1.0, 3.0, 10.0), reference_lr=1.0,
      steps=500,
      settings={"clip_by_value": 0.01, "adaptive_grad_clip": 0.01},
      margin=("x", 2.0),
      log_loss=True,
      note=(f"fresh batches of {batch} sequences each step; validation on"
            f" 512 fixed sequences; predicting the mean gives MSE 1/6 ="
            " 0.167."))


TASKS: dict[str, Callable[..., Task]] = {
    "transformer": transformer, "regression": regression, "lstm": lstm}
