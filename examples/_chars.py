"""Shared by the character-level transformer examples (loss_spikes.py,
muon_stability.py): Python's own text as data, a small pre-norm causal
transformer, and finding a state in an optimizer's state."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx


def load_text() -> tuple[np.ndarray, int]:
  """``pydoc_data.topics`` as character ids, and the vocabulary size."""
  from pydoc_data.topics import topics
  text = "".join(topics[k] for k in sorted(topics))
  chars = sorted(set(text))
  lookup = {c: i for i, c in enumerate(chars)}
  return np.array([lookup[c] for c in text], np.int32), len(chars)


def find(tree: Any, kind: type) -> Any:
  """The first state of type ``kind`` in an optimizer state, or None."""
  for x in jax.tree_util.tree_leaves(tree,
                                     is_leaf=lambda x: isinstance(x, kind)):
    if isinstance(x, kind):
      return x
  return None


class Block(nnx.Module):
  """Pre-norm attention and MLP. With ``attention_fn`` (e.g.
  ``oc.max_logit_attention``) the attention is called with
  ``sow_weights=True``, which hands it the module to sow into."""

  def __init__(self, dim: int, heads: int, rngs: nnx.Rngs,
               attention_fn: Callable[..., Any] | None = None):
    kwargs = {} if attention_fn is None else {"attention_fn": attention_fn}
    self.sow = attention_fn is not None
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs,
                                       **kwargs)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.up = nnx.Linear(dim, 4 * dim, rngs=rngs)
    self.down = nnx.Linear(4 * dim, dim, rngs=rngs)

  def __call__(self, x, mask):
    x = x + self.attn(self.norm1(x), mask=mask, sow_weights=self.sow)
    return x + self.down(nnx.gelu(self.up(self.norm2(x))))


class CharTransformer(nnx.Module):
  """Embeddings, learned positions, ``layers`` blocks, a linear head."""

  def __init__(self, vocab: int, length: int, dim: int, heads: int,
               layers: int, rngs: nnx.Rngs,
               attention_fn: Callable[..., Any] | None = None):
    self.embed = nnx.Embed(vocab, dim, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(),
                                                  (length, dim)))
    self.blocks = nnx.List([Block(dim, heads, rngs, attention_fn)
                            for _ in range(layers)])
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, vocab, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.pos[: tokens.shape[-1]]
    mask = nnx.make_causal_mask(tokens)
    for block in self.blocks:
      x = block(x, mask)
    return self.head(self.norm(x))
