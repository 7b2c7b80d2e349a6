"""layer_axis: a leaf that stacks layers clips and records each layer's slice
as a tensor of its own, exactly as if every layer were a leaf.

The reference is the same tree unstacked (each layer a separate leaf) run
through the same transform without ``layer_axis``: per-layer norms, clipped
updates and per-tensor statistics must agree, under ``jax.jit``, in float32
and bfloat16, for any number of layers, layer-axis position and shapes
(hypothesis), and with the stack sharded over the devices.
"""

import functools
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optaxclip as oc

nnx = pytest.importorskip("flax.nnx")

STEPS = (1.0, 0.5, 8.0)  # A spike at the last step: something clips.


def stacked_tree(layers, shape, at, dtype, seed=0):
  """A stacked kernel and bias (layer axis ``at``) and an unstacked head."""
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((layers,) + shape) * rng.uniform(0.1, 3, (
      layers,) + (1,) * len(shape))
  b = rng.standard_normal((layers, shape[-1]))
  head = rng.standard_normal((shape[-1], 3))
  return {"blocks": {"w": jnp.asarray(np.moveaxis(w, 0, at), dtype),
                     "b": jnp.asarray(b, dtype)},
          "head": jnp.asarray(head, dtype)}


def unstack(tree, at):
  """The same tree with each layer a leaf of its own."""
  w, b = tree["blocks"]["w"], tree["blocks"]["b"]
  return {"blocks": [{"w": jnp.take(w, i, axis=at), "b": b[i]}
                     for i in range(b.shape[0])], "head": tree["head"]}


def restack(tree, at):
  blocks = tree["blocks"]
  if isinstance(blocks, dict):  # A per-tensor statistic, stacked already.
    return tree
  return {"blocks": {"w": jnp.stack([x["w"] for x in blocks], axis=at),
                     "b": jnp.stack([x["b"] for x in blocks])},
          "head": tree["head"]}


def per_layer(tree):
  """Per-tensor statistics of the unstacked tree, as per-layer vectors."""
  blocks = tree["blocks"]
  return {"blocks": {k: jnp.stack([x[k] for x in blocks]) for k in ("w", "b")},
          "head": tree["head"]}


TRANSFORMS = {
    "clip_by_global_norm": lambda la: oc.clip_by_global_norm(
        2.0, leaf_norms=True, layer_axis=la),
    "clip_by_norm": lambda la: oc.clip_by_norm(
        1.5, leaf_norms=True, layer_axis=la),
    "adaptive_grad_clip": lambda la: oc.adaptive_grad_clip(
        0.3, leaf_norms=True, layer_axis=la),
    "adagc": lambda la: oc.adagc(warmup_steps=1, max_norm=4.0,
                                 layer_axis=la),
    "clip_by_quantile": lambda la: oc.clip_by_quantile(
        0.5, window=4, leaf_norms=True, layer_axis=la),
    "clip_by_quantile(per_leaf)": lambda la: oc.clip_by_quantile(
        0.5, window=4, per_leaf=True, layer_axis=la),
    "zclip": lambda la: oc.zclip(oc.ZScore(warmup_steps=2), leaf_norms=True,
                                 layer_axis=la),
    "skip_step": lambda la: oc.skip_step(optax.identity(), skip_norm=1e3,
                                         leaf_norms=True, layer_axis=la),
}
# The per-tensor fields of each state, compared layer by layer.
FIELDS = {"adagc": ("stats.leaf_norms", "leaf_thresholds", "leaf_scales",
                    "gamma"),
          "clip_by_quantile(per_leaf)": ("stats.leaf_norms",
                                         "stats.threshold")}
# The record's whole-update fields, the same stacked or not.
SCALARS = ("count", "norm", "scale", "clipped", "num_clipped", "frac_clipped")


def field_of(state, field):
  """``state.stats.leaf_norms`` for ``"stats.leaf_norms"``."""
  for name in field.split("."):
    state = getattr(state, name)
  return state


def run(name, trees, params, layer_axis):
  """Runs the transform over ``trees``, one per step."""
  tx = TRANSFORMS[name](layer_axis)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for g in trees:
    updates, state = update(g, state, params)
  return updates, state


def check_same(name, layers, shape, at, dtype, seed=0):
  # Each step its own gradients, every layer scaled its own way, so that
  # layers differ in what the statistics make of them.
  trees = [jax.tree_util.tree_map(
      lambda x, s=s: (x * s).astype(x.dtype),
      stacked_tree(layers, shape, at, dtype, seed + 2 + i))
           for i, s in enumerate(STEPS)]
  params = stacked_tree(layers, shape, at, dtype, seed + 1)
  got, got_state = run(name, trees, params,
                       {"blocks": {"w": at, "b": 0}, "head": None})
  want, want_state = run(name, [unstack(t, at) for t in trees],
                         unstack(params, at), None)
  tol = dict(rtol=2e-2, atol=1e-6) if dtype == jnp.bfloat16 else dict(
      rtol=2e-5, atol=1e-7)
  for a, b in zip(jax.tree_util.tree_leaves(got),
                  jax.tree_util.tree_leaves(restack(want, at))):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32),
                               np.asarray(b, np.float32), **tol)
  for field in FIELDS.get(name, ("stats.leaf_norms",)):
    a = field_of(got_state, field)
    b = field_of(want_state, field)
    b = per_layer(b) if field != "stats.leaf_norms" or name not in (
        "clip_by_norm", "adaptive_grad_clip") else restack_units(b, at)
    for x, y in zip(jax.tree_util.tree_leaves(a),
                    jax.tree_util.tree_leaves(b)):
      assert x.shape == y.shape, (field, x.shape, y.shape)
      np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-7)
  for field in SCALARS:
    a = getattr(got_state.stats, field)
    b = getattr(want_state.stats, field)
    assert (a is None) == (b is None), field
    if a is not None:
      np.testing.assert_allclose(np.asarray(a, np.float32),
                                 np.asarray(b, np.float32), **tol,
                                 err_msg=field)


def restack_units(norms, at):
  """Per-unit norms of the unstacked tree, with the layer axis where the
  stacked leaf's kept shape has it (reduced axes dropped)."""
  blocks = norms["blocks"]
  w = jnp.stack([x["w"] for x in blocks])  # Layer axis first.
  # AGC's units of a 2-D or 3-D slice reduce its first axis: the layer axis
  # sits one place earlier among the kept axes, unless it is the first.
  return {"blocks": {"w": w if w.ndim == 1 else jnp.moveaxis(
      w, 0, max(at - 1, 0)), "b": jnp.stack([x["b"] for x in blocks])},
          "head": norms["head"]}


# The fast tier runs these; the whole suite runs every transform in both.
FAST = {("clip_by_norm", jnp.float32), ("clip_by_norm", jnp.bfloat16),
        ("clip_by_global_norm", jnp.float32), ("adagc", jnp.float32)}
CASES = [pytest.param(name, dtype, id=f"{name}-{jnp.dtype(dtype).name}",
                      marks=() if (name, dtype) in FAST else pytest.mark.slow)
         for name in sorted(TRANSFORMS) for dtype in (jnp.float32,
                                                      jnp.bfloat16)]


@pytest.mark.parametrize("name, dtype", CASES)
def test_stacked_is_unstacked(name, dtype):
  check_same(name, 3, (4, 5), 0, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TRANSFORMS))
@settings(max_examples=3, deadline=None)
@given(layers=st.integers(1, 4),
       shape=st.sampled_from([(3,), (4, 5), (2, 3, 4)]),
       where=st.sampled_from(["first", "middle", "last"]),
       seed=st.integers(0, 100))
def test_stacked_is_unstacked_property(name, layers, shape, where, seed):
  at = {"first": 0, "middle": len(shape) // 2, "last": len(shape)}[where]
  check_same(name, layers, shape, at, jnp.float32, seed)


def test_per_layer_norms_are_each_layers_norm():
  # Against float64 NumPy: each layer's 2-norm, over every other axis.
  tree = stacked_tree(4, (3, 5), 1, jnp.float32)
  tx = oc.clip_by_global_norm(1.0, leaf_norms=True,
                              layer_axis={"blocks": 1, "head": None})
  _, state = tx.update(tree, tx.init(tree))
  w = np.asarray(tree["blocks"]["w"], np.float64)
  want = np.sqrt(np.sum(np.square(w), axis=(0, 2)))
  np.testing.assert_allclose(state.stats.leaf_norms["blocks"]["w"], want,
                             rtol=1e-6)
  assert state.stats.leaf_norms["head"].shape == ()
  total = np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                      for x in jax.tree_util.tree_leaves(tree)))
  np.testing.assert_allclose(state.stats.norm, total, rtol=1e-6)


def test_clip_by_norm_clips_each_layer_alone():
  g = {"w": jnp.stack([jnp.full((2, 2), 0.1), jnp.full((2, 2), 10.0)])}
  tx = oc.clip_by_norm(1.0, layer_axis=0)
  updates, state = tx.update(g, tx.init(g))
  np.testing.assert_array_equal(updates["w"][0], g["w"][0])  # Untouched.
  np.testing.assert_allclose(updates["w"][1], jnp.full((2, 2), 0.5))
  assert float(state.stats.frac_clipped) == 0.5


@pytest.mark.slow
def test_agc_units_of_a_stacked_kernel():
  # (layers, in, out): the units of each (in, out) slice, per layer.
  rng = np.random.default_rng(0)
  g = {"k": jnp.asarray(rng.standard_normal((3, 4, 5)), jnp.float32)}
  p = {"k": jnp.asarray(rng.standard_normal((3, 4, 5)), jnp.float32)}
  tx = oc.adaptive_grad_clip(0.1, leaf_norms=True, layer_axis=0)
  updates, state = tx.update(g, tx.init(p), p)
  assert state.stats.leaf_norms["k"].shape == (3, 5)
  for i in range(3):
    one = oc.adaptive_grad_clip(0.1)
    want, _ = one.update({"k": g["k"][i]}, one.init({"k": p["k"][i]}),
                         {"k": p["k"][i]})
    np.testing.assert_allclose(updates["k"][i], want["k"], rtol=1e-6)
  # An explicit axis counts in the stacked leaf.
  tx = oc.adaptive_grad_clip(0.1, axis=1, layer_axis=0)
  again, _ = tx.update(g, tx.init(p), p)
  np.testing.assert_array_equal(again["k"], updates["k"])


@pytest.mark.parametrize("make", [
    lambda: oc.clip_by_norm(1.0, axis=0, layer_axis=0),
    lambda: oc.adaptive_grad_clip(0.1, axis=(0, 1), layer_axis=0)])
def test_a_unit_axis_may_not_be_the_layer_axis(make):
  g = {"k": jnp.ones((3, 4, 5))}
  tx = make()
  with pytest.raises(ValueError, match="layer axis"):
    tx.update(g, tx.init(g), g)


def test_clip_stats_names_layers_by_index():
  tree = stacked_tree(3, (4,), 0, jnp.float32)
  tx = oc.clip_by_global_norm(1.0, leaf_norms=True,
                              layer_axis={"blocks": 0, "head": None})
  _, state = tx.update(tree, tx.init(tree))
  stats = oc.clip_stats(state, scalars=True)
  keys = {k for k in stats if "leaf_norms" in k}
  assert keys == {f"clip_by_global_norm/leaf_norms/blocks/{n}[{i}]"
                  for n in ("b", "w") for i in range(3)} | {
                      "clip_by_global_norm/leaf_norms/head"}
  np.testing.assert_allclose(
      stats["clip_by_global_norm/leaf_norms/blocks/w[2]"],
      np.linalg.norm(np.asarray(tree["blocks"]["w"][2])), rtol=1e-6)
  # Without layer_axis, the keys are one per leaf, as before.
  plain = oc.clip_by_global_norm(1.0, leaf_norms=True)
  _, state = plain.update(tree, plain.init(tree))
  assert {k for k in oc.clip_stats(state, scalars=True)
          if "leaf_norms" in k} == {
              "clip_by_global_norm/leaf_norms/blocks/b",
              "clip_by_global_norm/leaf_norms/blocks/w",
              "clip_by_global_norm/leaf_norms/head"}


@pytest.mark.slow
def test_sharded_jit_with_the_stack_split_along_another_axis():
  devices = np.array(jax.devices())
  mesh = jax.sharding.Mesh(devices, ("model",))
  spec = jax.sharding.PartitionSpec
  tree = stacked_tree(3, (8, 16), 0, jnp.float32)
  shardings = {"blocks": {"w": spec(None, None, "model"),
                          "b": spec(None, "model")}, "head": spec("model")}
  put = jax.tree_util.tree_map(
      lambda x, s: jax.device_put(x, jax.sharding.NamedSharding(mesh, s)),
      tree, shardings, is_leaf=lambda s: isinstance(s, spec))
  la = {"blocks": 0, "head": None}
  for name in ("clip_by_norm", "clip_by_global_norm", "adagc"):
    tx = TRANSFORMS[name](la)
    want, want_state = jax.jit(tx.update)(tree, tx.init(tree), tree)
    got, got_state = jax.jit(tx.update)(put, tx.init(put), put)
    for a, b in zip(jax.tree_util.tree_leaves((got, got_state)),
                    jax.tree_util.tree_leaves((want, want_state))):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert got["blocks"]["w"].sharding.spec == spec(None, None, "model")


def test_shard_map_with_axis_name():
  devices = np.array(jax.devices())
  mesh = jax.sharding.Mesh(devices, ("model",))
  spec = jax.sharding.PartitionSpec
  tree = stacked_tree(3, (8, 16), 0, jnp.float32)
  la = {"blocks": 0, "head": None}
  specs = {"blocks": {"w": spec(None, None, "model"), "b": spec()},
           "head": spec()}
  tx = oc.clip_by_norm(1.5, layer_axis=la, leaf_norms=True,
                       axis_name="model")

  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(specs,),
                     out_specs=(specs, spec()))
  def clip(g):
    updates, state = tx.update(g, tx.init(g))
    return updates, state.stats.leaf_norms["blocks"]["w"]

  got, norms = jax.jit(clip)(tree)
  plain = oc.clip_by_norm(1.5, layer_axis=la, leaf_norms=True)
  want, state = plain.update(tree, plain.init(tree))
  np.testing.assert_allclose(norms, state.stats.leaf_norms["blocks"]["w"],
                             rtol=1e-6)
  np.testing.assert_allclose(got["blocks"]["w"], want["blocks"]["w"],
                             rtol=1e-6)


# ----------------------------------------------------------------------------
# oc.layer_axes: the tree read off a Flax NNX model.

META = {"eager_sharding": False}


class Block(nnx.Module):

  def __init__(self, rngs):
    self.linear = nnx.Linear(
        4, 4, rngs=rngs,
        kernel_metadata={"out_sharding": (None, "model"), **META},
        bias_metadata={"out_sharding": ("model",), **META})
    self.norm = nnx.LayerNorm(
        4, rngs=rngs, scale_metadata={"out_sharding": (None,), **META},
        bias_metadata={"out_sharding": (None,), **META})

  def __call__(self, x):
    return x + self.linear(self.norm(x))


class Stacked(nnx.Module):

  def __init__(self, rngs, annotate_head=True):
    @nnx.vmap(transform_metadata={nnx.PARTITION_NAME: "layers"})
    def blocks(key):
      return Block(nnx.Rngs(key))

    self.blocks = blocks(jax.random.split(rngs.params(), 3))
    self.head = nnx.Linear(
        4, 1, rngs=rngs,
        kernel_metadata={"out_sharding": (None, None), **META}
        if annotate_head else {},
        bias_metadata={"out_sharding": (None,), **META})

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, block):
      return block(x)

    return self.head(body(x, self.blocks))


@pytest.mark.skipif(
    tuple(int(re.match(r"\d*", p).group() or 0)
          for p in flax.__version__.split(".")[:3]) < (0, 12, 4),
    reason="Flax < 0.12.4 spells out_sharding as sharding_names")
def test_layer_axes_of_an_nnx_model():
  model = Stacked(nnx.Rngs(0))
  axes = oc.layer_axes(model)
  flat = {jax.tree_util.keystr(p, simple=True, separator="/"): v
          for p, v in jax.tree_util.tree_leaves_with_path(
              axes, is_leaf=lambda x: x is None)}
  assert flat == {"blocks/linear/bias": 0, "blocks/linear/kernel": 0,
                  "blocks/norm/bias": 0, "blocks/norm/scale": 0,
                  "head/bias": None, "head/kernel": None}


@pytest.mark.slow
def test_layer_axes_in_an_nnx_optimizer():
  # Per-layer norms of the scanned blocks, keyed by layer.
  model = Stacked(nnx.Rngs(0))
  tx = oc.clip_by_global_norm(1.0, leaf_norms=True,
                              layer_axis=oc.layer_axes(model))
  optimizer = nnx.Optimizer(model, optax.chain(tx, optax.sgd(0.1)),
                            wrt=nnx.Param)
  x = jnp.ones((2, 4))
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
  optimizer.update(model, grads)
  stats = oc.clip_stats(optimizer.opt_state, scalars=True)
  for i in range(3):
    want = np.linalg.norm(np.asarray(grads["blocks"]["linear"]["kernel"][
        i]))
    np.testing.assert_allclose(
        stats[f"clip_by_global_norm/leaf_norms/blocks/linear/kernel[{i}]"],
        want, rtol=1e-6)


def test_layer_axes_needs_sharding_metadata():
  model = Stacked(nnx.Rngs(0), annotate_head=False)
  with pytest.raises(ValueError, match="head/kernel"):
    oc.layer_axes(model)


# ----------------------------------------------------------------------------
# oc.layer_axes on linen, NNX without sharding metadata, Equinox, dicts.

linen = pytest.importorskip("flax.linen")


class LinenBlock(linen.Module):
  """A pre-norm residual block; with ``boxed``, a LogicallyPartitioned
  kernel."""

  boxed: bool = False

  @linen.compact
  def __call__(self, x, _):
    init = linen.initializers.lecun_normal()
    if self.boxed:
      init = linen.with_logical_partitioning(init, ("embed", "mlp"))
    return x + linen.Dense(4, kernel_init=init)(linen.LayerNorm()(x)), None


@functools.lru_cache(maxsize=2)
def _vit_params(boxed=False):
  """big_vision's layout: nn.scan over nn.remat'd blocks, named
  'encoderblock' inside 'Transformer'; with ``boxed``, the scan inserts
  'layers' in the names of the LogicallyPartitioned kernels."""

  class Transformer(linen.Module):
    @linen.compact
    def __call__(self, x):
      meta = {linen.PARTITION_NAME: "layers"} if boxed else {}
      x, _ = linen.scan(linen.remat(LinenBlock), variable_axes={"params": 0},
                        split_rngs={"params": True}, length=3,
                        metadata_params=meta)(boxed=boxed,
                                              name="encoderblock")(x, None)
      return linen.LayerNorm(name="encoder_norm")(x)

  class ViT(linen.Module):
    @linen.compact
    def __call__(self, x):
      x = Transformer(name="Transformer")(linen.Dense(4, name="embedding")(x))
      return linen.Dense(2, name="head")(x)

  model = ViT()
  return model, jax.jit(model.init)(jax.random.key(0), jnp.ones((2, 4)))[
      "params"]


def _at(path):
  """A leaf's path as 'a/b/c', NNX's '.value' steps left out."""
  return jax.tree_util.keystr(tuple(
      k for k in path if getattr(k, "name", None) != "value"), simple=True,
                              separator="/")


def _flat(tree):
  return {_at(p): v for p, v in jax.tree_util.tree_leaves_with_path(
      tree, is_leaf=lambda x: x is None)}


def _per_layer_reference(grads, axes):
  """Each stacked leaf's per-layer 2-norms, in float64 NumPy."""
  out = {}
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    at = _at(path)
    g = np.asarray(g, np.float64)
    k = axes[at]
    out[at] = (np.sqrt(np.sum(np.square(g))) if k is None else np.sqrt(
        np.sum(np.square(np.moveaxis(g, k, 0)).reshape(g.shape[k], -1),
               axis=1)))
  return out


@pytest.mark.slow
def test_layer_axes_of_linen_scan_by_path():
  model, params = _vit_params()
  axes = oc.layer_axes(params, stacked="encoderblock")
  flat = _flat(axes)
  assert {k for k, v in flat.items() if v == 0} == {
      f"Transformer/encoderblock/{m}" for m in (
          "Dense_0/bias", "Dense_0/kernel", "LayerNorm_0/bias",
          "LayerNorm_0/scale")}
  assert all(v is None for k, v in flat.items() if "encoderblock" not in k)
  # Per-layer norms of the real gradients, against float64 NumPy.
  x = jnp.linspace(-1, 1, 8).reshape(2, 4)
  grads = jax.jit(jax.grad(
      lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)))(params)
  tx = oc.clip_by_global_norm(1.0, leaf_norms=True, layer_axis=axes)
  _, state = tx.update(grads, tx.init(params))
  want = _per_layer_reference(grads, flat)
  for at, got in _flat(state.stats.leaf_norms).items():
    np.testing.assert_allclose(got, want[at], rtol=1e-5, err_msg=at)
  assert state.stats.leaf_norms["Transformer"]["encoderblock"]["Dense_0"][
      "kernel"].shape == (3,)


@pytest.mark.slow
def test_layer_axes_of_linen_partitioned_names():
  _, params = _vit_params(boxed=True)
  flat = _flat(oc.layer_axes(params, stacked=["encoder_norm"]))
  # The boxed kernel says 'layers' at axis 0; unboxed leaves elsewhere are
  # not stacked once stacked= names the rest; encoder_norm by its path.
  assert flat["Transformer/encoderblock/Dense_0/kernel"] == 0
  assert flat["Transformer/encoderblock/Dense_0/bias"] is None
  assert flat["Transformer/encoder_norm/scale"] == 0
  assert flat["head/kernel"] is None
  with pytest.raises(ValueError, match=r"Transformer/encoderblock/Dense_0/bias"
                     r".*'Transformer/encoderblock' \(3 layers\)"):
    oc.layer_axes(params)


def _vit_like_params():
  """The paths and shapes of ``_vit_params()``'s tree, without Flax."""
  def dense(i, o, layers=()):
    return {"kernel": np.zeros(layers + (i, o)), "bias": np.zeros(layers + (o,))}

  def norm(d, layers=()):
    return {"scale": np.ones(layers + (d,)), "bias": np.zeros(layers + (d,))}

  return {"Transformer": {"encoderblock": {"Dense_0": dense(4, 4, (3,)),
                                           "LayerNorm_0": norm(4, (3,))},
                          "encoder_norm": norm(4)},
          "embedding": dense(4, 4), "head": dense(4, 2)}


def test_layer_axes_errors_name_the_models_keys():
  params = _vit_like_params()
  with pytest.raises(ValueError, match=r"stacked='blocks' names no parameter"
                     r".*'Transformer/encoderblock'.*'head/kernel'"):
    oc.layer_axes(params, stacked="blocks")
  # Unstacked subtrees disagree on their leading dimension.
  with pytest.raises(ValueError, match="disagree on the number of layers"):
    oc.layer_axes(params, stacked="Transformer")
  with pytest.raises(ValueError, match=r"stacked='Transformer/encoderblock'\)"):
    oc.layer_axes(params)
  with pytest.raises(ValueError, match="no axis 3"):
    oc.layer_axes(params, stacked={"encoderblock": 3})
  with pytest.raises(TypeError, match="stacked must be a path"):
    oc.layer_axes(params, stacked=0)
  with pytest.raises(TypeError, match=r"stacked\['encoderblock'\] must be an"
                     r" int"):
    oc.layer_axes(params, stacked={"encoderblock": "0"})


class ScanMLP(nnx.Module):
  """The layout of Flax's examples/nnx_toy_examples/06_scan_over_layers.py:
  blocks made by nnx.vmap with no sharding metadata, run by nnx.scan."""

  def __init__(self, dim, n_layers, rngs):
    @nnx.split_rngs(splits=n_layers)
    @nnx.vmap(axis_size=n_layers)
    def make(rngs):
      return Block6(dim, rngs)

    self.layers = make(rngs)

  def __call__(self, x):
    @nnx.scan
    def body(x, block):
      return block(x), None

    return body(x, self.layers)[0]


class Block6(nnx.Module):

  def __init__(self, dim, rngs):
    self.linear = nnx.Linear(dim, dim, rngs=rngs)
    self.norm = nnx.LayerNorm(dim, rngs=rngs)

  def __call__(self, x):
    return jax.nn.gelu(self.norm(self.linear(x)))


@pytest.mark.slow
def test_layer_axes_of_nnx_without_sharding_metadata():
  model = ScanMLP(4, 3, nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"'layers' \(3 layers\).*"
                     r"oc.layer_axes\(model, stacked='layers'\)"):
    oc.layer_axes(model)
  axes = oc.layer_axes(model, stacked="layers")
  assert isinstance(axes, nnx.State)
  assert set(_flat(axes).values()) == {0}
  x = jnp.ones((2, 4))
  grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(model)
  want = _per_layer_reference(grads, _flat(axes))
  # The State from layer_axes, and a plain dict prefix, on NNX gradients.
  for layer_axis in (axes, {"layers": 0}):
    tx = oc.clip_by_global_norm(1.0, leaf_norms=True, layer_axis=layer_axis)
    _, state = tx.update(grads, tx.init(grads))
    for at, got in _flat(state.stats.leaf_norms).items():
      np.testing.assert_allclose(got, want[at], rtol=1e-5, err_msg=at)


@pytest.mark.slow
def test_layer_axes_of_an_equinox_model():
  eqx = pytest.importorskip("equinox")

  class Block(eqx.Module):
    linear: eqx.nn.Linear
    norm: eqx.nn.LayerNorm

    def __init__(self, key):
      self.linear = eqx.nn.Linear(4, 4, key=key)
      self.norm = eqx.nn.LayerNorm(4)

  class Model(eqx.Module):
    layers: Block
    head: eqx.nn.Linear

    def __init__(self, key):
      k1, k2 = jax.random.split(key)
      self.layers = eqx.filter_vmap(Block)(jax.random.split(k1, 3))
      self.head = eqx.nn.Linear(4, 2, key=k2)

  model = Model(jax.random.key(0))
  axes = oc.layer_axes(model, stacked="layers")
  assert isinstance(axes, Model)
  flat = _flat(axes)
  assert {k for k, v in flat.items() if v == 0} == {
      "layers/linear/weight", "layers/linear/bias", "layers/norm/weight",
      "layers/norm/bias"}
  assert flat["head/weight"] is None
  grads = jax.tree_util.tree_map(jnp.ones_like, eqx.filter(
      model, eqx.is_inexact_array))
  tx = oc.clip_by_global_norm(1.0, leaf_norms=True, layer_axis=axes)
  _, state = tx.update(grads, tx.init(grads))
  np.testing.assert_allclose(state.stats.leaf_norms.layers.linear.weight,
                             np.full(3, 4.0))
  assert state.stats.leaf_norms.head.weight.shape == ()


def test_a_dict_prefix_for_nnx_gradients():
  # A plain dict matches the nnx.State the gradients come in, as
  # layer_axis and as a tree of thresholds.
  grads = nnx.State({"blocks": {"w": jnp.full((3, 2, 2), 0.5)},
                     "head": jnp.ones(2)})
  tx = oc.clip_by_norm({"blocks": 0.5, "head": 10.0}, leaf_norms=True,
                       layer_axis={"blocks": 0, "head": None})
  updates, state = tx.update(grads, tx.init(grads))
  np.testing.assert_allclose(state.stats.leaf_norms["blocks"]["w"],
                             np.ones(3))
  np.testing.assert_allclose(updates["blocks"]["w"], np.full((3, 2, 2), 0.25))
  np.testing.assert_array_equal(updates["head"], np.ones(2))
  with pytest.raises(ValueError, match="layer_axis tree does not match"):
    oc.clip_by_norm(1.0, layer_axis={"blocks": 0}).update(
        grads, tx.init(grads))
