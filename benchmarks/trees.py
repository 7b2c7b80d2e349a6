"""Gradient trees with the shapes of real networks, generated locally.

Every tree is a nested dict of arrays. Values are drawn from a normal
distribution with standard deviation ``SIGMA`` for gradients (a different seed
gives parameters), so thresholds can be set relative to known norms.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

SIGMA = 1e-3

Shapes = dict[str, "Shapes | tuple[int, ...]"]


def mlp_shapes() -> Shapes:
  """A small MLP, 784-512-512-10."""
  sizes = [784, 512, 512, 10]
  return {f"dense_{i}": {"kernel": (a, b), "bias": (b,)}
          for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))}


def resnet50_shapes() -> Shapes:
  """ResNet-50 (He et al. 2016): HWIO convolutions, batch-norm scale and bias."""
  def conv_bn(k, cin, cout):
    return {"conv": {"kernel": (k, k, cin, cout)},
            "bn": {"scale": (cout,), "bias": (cout,)}}

  tree: Shapes = {"stem": conv_bn(7, 3, 64)}
  cin = 64
  for s, (blocks, mid) in enumerate([(3, 64), (4, 128), (6, 256), (3, 512)]):
    cout = 4 * mid
    for b in range(blocks):
      block = {"conv_bn_0": conv_bn(1, cin, mid),
               "conv_bn_1": conv_bn(3, mid, mid),
               "conv_bn_2": conv_bn(1, mid, cout)}
      if b == 0:
        block["projection"] = conv_bn(1, cin, cout)
      tree[f"stage_{s}_block_{b}"] = block
      cin = cout
  tree["head"] = {"kernel": (2048, 1000), "bias": (1000,)}
  return tree


def gpt2_shapes() -> Shapes:
  """GPT-2 small (Radford et al. 2019): 12 layers, width 768, tied embedding."""
  d, vocab, ctx, ff = 768, 50257, 1024, 3072

  def dense(a, b):
    return {"kernel": (a, b), "bias": (b,)}

  def norm():
    return {"scale": (d,), "bias": (d,)}

  tree: Shapes = {"wte": {"embedding": (vocab, d)},
                  "wpe": {"embedding": (ctx, d)}}
  for i in range(12):
    tree[f"h_{i}"] = {"ln_1": norm(),
                      "attn": {"c_attn": dense(d, 3 * d),
                               "c_proj": dense(d, d)},
                      "ln_2": norm(),
                      "mlp": {"c_fc": dense(d, ff), "c_proj": dense(ff, d)}}
  tree["ln_f"] = norm()
  return tree


def tiny_shapes() -> Shapes:
  """A few small leaves, for smoke tests."""
  return {"conv": {"kernel": (3, 3, 2, 4)}, "dense": {"kernel": (16, 8),
                                                      "bias": (8,)},
          "scale": (8,)}


TREES: dict[str, Callable[[], Shapes]] = {
    "mlp": mlp_shapes,
    "resnet50": resnet50_shapes,
    "gpt2": gpt2_shapes,
    "tiny": tiny_shapes,
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _is_shape(x) -> bool:
  return isinstance(x, tuple)


def num_params(shapes: Shapes) -> int:
  return sum(math.prod(s) for s in jax.tree_util.tree_leaves(
      shapes, is_leaf=_is_shape))


def num_leaves(shapes: Shapes) -> int:
  return len(jax.tree_util.tree_leaves(shapes, is_leaf=_is_shape))


def make_tree(shapes: Shapes, dtype, seed: int, sigma: float = SIGMA):
  """A tree of ``N(0, sigma**2)`` arrays with the given shapes and dtype."""
  leaves, treedef = jax.tree_util.tree_flatten(shapes, is_leaf=_is_shape)
  key = jax.random.PRNGKey(seed)
  out = []
  for i, shape in enumerate(leaves):
    x = jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)
    out.append((x * sigma).astype(dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def copy_tree(tree):
  """Fresh device buffers holding the same values (for donation)."""
  return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), tree)


def tree_nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def tree_norm64(tree) -> float:
  """The global 2-norm in float64 on the host."""
  return math.sqrt(sum(float(np.sum(np.square(np.asarray(x, np.float64))))
                       for x in jax.tree_util.tree_leaves(tree)))
