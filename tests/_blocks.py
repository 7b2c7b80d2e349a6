"""Runs Markdown ``python`` blocks in order and checks what they print; small
models of Flax linen and Equinox shared by tests."""

import contextlib
import io
from typing import Any

import jax
import jax.numpy as jnp


def run_blocks(blocks: list[str], filename: str) -> None:
  """Runs ``blocks`` in one namespace; each may end with its expected output.

  The ``# `` comment lines that end a block are the output it shows; when
  there are any, the block must print exactly those lines.
  """
  namespace: dict = {}
  for block in blocks:
    lines = block.rstrip().splitlines()
    expected = []
    while lines and lines[-1].startswith("# "):
      expected.insert(0, lines.pop()[2:])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      exec(compile(block, filename, "exec"), namespace)  # noqa: S102
    if expected:
      assert out.getvalue().splitlines() == expected, filename


# ----------------------------------------------------------------------------
# Small models of other frameworks, shared by tests (imports inside).


def linen_vit(*, depth: int = 2, dim: int = 8, heads: int = 2, patch: int = 3,
              classes: int = 3):
  """A linen ViT laid out as big_vision's: patch convolution, a position
  table, blocks run by ``nn.scan`` over ``nn.remat``'d blocks (params
  stacked on axis 0), a pooled ``nn.Dense`` head. Returns the module."""
  import flax.linen as nn

  class Block(nn.Module):

    @nn.compact
    def __call__(self, x, _):
      y = nn.LayerNorm()(x)
      x = x + nn.MultiHeadDotProductAttention(num_heads=heads)(y, y)
      y = nn.Dense(2 * dim)(nn.LayerNorm()(x))
      return x + nn.Dense(dim)(nn.gelu(y)), None

  class ViT(nn.Module):

    @nn.compact
    def __call__(self, images):
      x = nn.Conv(dim, (patch, patch), strides=patch, padding="VALID")(images)
      x = x.reshape(x.shape[0], -1, dim)
      x = x + self.param("pos", nn.initializers.normal(0.02),
                         (1, x.shape[1], dim))
      blocks = nn.scan(nn.remat(Block, prevent_cse=False),
                       variable_axes={"params": 0},
                       split_rngs={"params": True}, length=depth)
      x, _ = blocks(name="blocks")(x, None)
      return nn.Dense(classes)(nn.LayerNorm()(x).mean(axis=1))

  return ViT()


def linen_lm(*, vocab: int = 11, dim: int = 8, heads: int = 2, depth: int = 2,
             seq: int = 6):
  """A linen language model laid out as nanodo's: ``nn.Embed``, a learned
  position table, causal attention blocks, the output tied to the embedding
  (``attend``). Returns the module."""
  import flax.linen as nn

  class Block(nn.Module):

    @nn.compact
    def __call__(self, x):
      mask = nn.make_causal_mask(jnp.ones(x.shape[:-1]))
      y = nn.RMSNorm()(x)
      x = x + nn.SelfAttention(num_heads=heads)(y, mask=mask)
      y = nn.Dense(2 * dim)(nn.RMSNorm()(x))
      return x + nn.Dense(dim)(nn.gelu(y))

  class LM(nn.Module):

    @nn.compact
    def __call__(self, tokens):
      embed = nn.Embed(vocab, dim)
      pos = self.param("pos", nn.initializers.normal(0.02), (seq, dim))
      x = embed(tokens) + pos[:tokens.shape[-1]]
      for _ in range(depth):
        x = Block()(x)
      return embed.attend(nn.LayerNorm()(x))

  return LM()


def equinox_block(key, *, vocab: int = 11, dim: int = 8, heads: int = 2):
  """An Equinox transformer block with an embedding and a head; it takes
  one example's tokens ``(seq,)`` and returns logits ``(seq, vocab)``."""
  import equinox as eqx

  class Model(eqx.Module):
    embed: Any
    norm1: Any
    attn: Any
    norm2: Any
    up: Any
    down: Any
    head: Any

    def __init__(self, key):
      k = jax.random.split(key, 5)
      self.embed = eqx.nn.Embedding(vocab, dim, key=k[0])
      self.norm1 = eqx.nn.LayerNorm(dim)
      self.attn = eqx.nn.MultiheadAttention(heads, dim, key=k[1])
      self.norm2 = eqx.nn.LayerNorm(dim)
      self.up = eqx.nn.Linear(dim, 2 * dim, key=k[2])
      self.down = eqx.nn.Linear(2 * dim, dim, key=k[3])
      self.head = eqx.nn.Linear(dim, vocab, key=k[4])

    def __call__(self, tokens):
      x = jax.vmap(self.embed)(tokens)
      y = jax.vmap(self.norm1)(x)
      causal = jnp.tril(jnp.ones((tokens.shape[0],) * 2, bool))
      x = x + self.attn(y, y, y, mask=causal)
      y = jax.vmap(self.up)(jax.vmap(self.norm2)(x))
      x = x + jax.vmap(self.down)(jax.nn.gelu(y))
      return jax.vmap(self.head)(x)

  return Model(key)
