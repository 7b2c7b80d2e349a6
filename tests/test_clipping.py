"""clip_by_value, clip_by_norm and clip_by_global_norm: references and properties."""

import functools
import math

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optaxclip as oc
from optaxclip import _norms
from tests import _helpers as helpers


def grads_tree(seed=0, dtype=jnp.float32, scale=1.0):
  rng = np.random.default_rng(seed)
  return {
      "dense": {"kernel": jnp.asarray(rng.standard_normal((8, 5)) * scale, dtype),
                "bias": jnp.asarray(rng.standard_normal(5) * scale, dtype)},
      "conv": jnp.asarray(rng.standard_normal((3, 3, 2, 4)) * scale, dtype),
  }


def f64(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def apply(tx, grads, params=None):
  """One step of ``tx`` on ``grads``."""
  return tx.update(grads, tx.init(grads if params is None else params), params)


def index(tree, i):
  """Entry ``i`` of a tree stacked over values (:func:`helpers.sweep`)."""
  return jax.tree.map(lambda x: x[i], tree)


# ----------------------------------------------------------------------------
# clip_by_global_norm.


@pytest.mark.parametrize(**helpers.JIT)
def test_global_matches_numpy_reference(jitted):
  grads = grads_tree(scale=3.0)
  tx = oc.clip_by_global_norm(2.0)
  updates, state = helpers.maybe_jit(tx.update, jitted)(grads, tx.init(grads))
  norm = helpers.np_norm(grads)
  want = jax.tree.map(lambda g: g * min(1.0, 2.0 / norm), f64(grads))
  chex.assert_trees_all_close(updates, want, rtol=1e-6)
  np.testing.assert_allclose(state.stats.norm, norm, rtol=1e-6)
  np.testing.assert_allclose(state.stats.scale, 2.0 / norm, rtol=1e-6)
  np.testing.assert_allclose(state.stats.threshold, 2.0)
  assert bool(state.stats.clipped)
  assert int(state.stats.num_clipped) == 1
  assert int(state.stats.count) == 1


@pytest.mark.parametrize(**helpers.JIT)
def test_global_matches_optax(jitted):
  grads = grads_tree(scale=2.0)  # Global norm about 21.

  def both(max_norm):
    ours, theirs = (oc.clip_by_global_norm(max_norm),
                    optax.clip_by_global_norm(max_norm))
    return apply(ours, grads)[0], apply(theirs, grads)[0]

  max_norms = [0.5, 5.0, 100.0]
  if jitted:  # One program: the threshold is a traced argument.
    ours, theirs = jax.jit(jax.vmap(both))(jnp.asarray(max_norms))
  else:  # Eager: nothing compiles per value.
    ours, theirs = jax.tree.map(lambda *x: jnp.stack(x),
                                *[both(t) for t in max_norms])
  chex.assert_trees_all_close(ours, theirs, rtol=1e-6)


def test_global_below_and_at_threshold_is_bit_identical():
  grads = grads_tree()
  norm = float(oc.global_norm(grads))
  updates, states = helpers.sweep(oc.clip_by_global_norm,
                                  [norm, norm * 2, math.inf], grads)
  for i in range(3):
    chex.assert_trees_all_equal(index(updates, i), grads)
  np.testing.assert_array_equal(states.stats.clipped, [False] * 3)
  np.testing.assert_array_equal(states.stats.scale, [1.0] * 3)
  np.testing.assert_array_equal(states.stats.norm, [np.float32(norm)] * 3)


@pytest.mark.parametrize("dtype, magnitude", [
    (jnp.float16, 300.0), (jnp.float32, 1e20), (jnp.bfloat16, 1e30)])
@pytest.mark.slow
def test_global_keeps_direction_where_optax_overflows(dtype, magnitude):
  rng = np.random.default_rng(3)
  grads = {"a": jnp.asarray(rng.uniform(0.5, 1.0, (64,)) * magnitude, dtype),
           "b": jnp.asarray(-rng.uniform(0.5, 1.0, (4, 4)) * magnitude, dtype)}
  updates, state = jax.jit(lambda g: apply(oc.clip_by_global_norm(1.0), g))(
      grads)
  assert np.isfinite(state.stats.norm)
  chex.assert_trees_all_equal_dtypes(updates, grads)
  np.testing.assert_allclose(helpers.np_norm(updates), 1.0, rtol=2e-2)
  # Same direction: the clipped update is a positive multiple of the input.
  g, u = (np.concatenate([np.asarray(x, np.float64).ravel()
                          for x in jax.tree.leaves(t)]) for t in (grads, updates))
  np.testing.assert_allclose(u / np.linalg.norm(u), g / np.linalg.norm(g),
                             atol=1e-2)
  # optax's norm overflows and its update is all zeros or NaN.
  theirs, _ = apply(optax.clip_by_global_norm(1.0), grads)
  assert not (np.isfinite(helpers.np_norm(theirs))
              and helpers.np_norm(theirs) > 0.5)


@pytest.mark.parametrize("ord", [1, 2, math.inf, 3, "rms"])
def test_global_ord(ord):
  grads = grads_tree(scale=2.0)
  updates, state = apply(oc.clip_by_global_norm(0.7, ord=ord), grads)
  np.testing.assert_allclose(oc.global_norm(updates, ord=ord), 0.7, rtol=1e-5)
  np.testing.assert_allclose(state.stats.norm, oc.global_norm(grads, ord=ord),
                             rtol=1e-6)
  np.testing.assert_allclose(state.stats.norm, helpers.np_norm(grads, ord),
                             rtol=1e-5)


def test_global_schedule_threshold():
  grads = {"w": jnp.asarray([30.0, 40.0])}
  tx = oc.clip_by_global_norm(optax.linear_schedule(1.0, 10.0, 9))
  state = tx.init(grads)
  step = jax.jit(tx.update)  # One program: the count is in the state.
  for k in range(12):
    updates, state = step(grads, state)
    want = 1.0 + min(k, 9)
    np.testing.assert_allclose(state.stats.threshold, want, rtol=1e-6)
    np.testing.assert_allclose(helpers.np_norm(updates), want, rtol=1e-6)
    assert int(state.stats.count) == k + 1


def test_global_jax_scalar_threshold_under_jit():
  grads = {"w": jnp.asarray([3.0, 4.0])}

  @jax.jit
  def run(t):
    return apply(oc.clip_by_global_norm(t), grads)[0]

  np.testing.assert_allclose(run(jnp.float32(2.5))["w"], [1.5, 2.0], rtol=1e-6)


@pytest.mark.slow
def test_global_inject_hyperparams():
  grads = {"w": jnp.asarray([3.0, 4.0])}
  tx = optax.inject_hyperparams(oc.clip_by_global_norm)(max_norm=1.0)
  state = tx.init(grads)
  step = jax.jit(tx.update)
  updates, state = step(grads, state)
  np.testing.assert_allclose(updates["w"], [0.6, 0.8], rtol=1e-6)
  state.hyperparams["max_norm"] = jnp.asarray(2.5)
  updates, state = step(grads, state)
  np.testing.assert_allclose(updates["w"], [1.5, 2.0], rtol=1e-6)
  # ord is injected as a traced array, and still gives the right norm.
  state.hyperparams["ord"] = jnp.asarray(1)
  updates, state = step(grads, state)
  np.testing.assert_allclose(optax.tree.get(state, "norm"), 7.0, rtol=1e-6)
  np.testing.assert_allclose(updates["w"], [3 * 2.5 / 7, 4 * 2.5 / 7],
                             rtol=1e-6)


def test_global_nonfinite_propagates():
  grads = {"w": jnp.asarray([1.0, jnp.nan]), "b": jnp.ones(2)}
  updates, state = apply(oc.clip_by_global_norm(1.0), grads)
  assert np.isnan(state.stats.norm)
  assert np.all(np.isnan(updates["b"]))  # As in optax and torch.


def test_global_none_masked_complex_and_dtypes():
  grads = {"a": jnp.asarray([3.0, 0.0], jnp.bfloat16), "n": None,
           "m": optax.MaskedNode(), "c": jnp.asarray([4j], jnp.complex64),
           "h": jnp.asarray([0.0], jnp.float16)}
  updates, state = apply(oc.clip_by_global_norm(1.0), grads)
  assert updates["n"] is None
  assert isinstance(updates["m"], optax.MaskedNode)
  chex.assert_trees_all_equal_dtypes(updates, grads)
  np.testing.assert_allclose(state.stats.norm, 5.0, rtol=1e-6)
  np.testing.assert_allclose(updates["c"], [0.8j], rtol=1e-6)


def test_global_float64():
  with jax.enable_x64(True):
    grads = {"w": jnp.asarray([3e200, 4e200], jnp.float64)}
    updates, state = apply(oc.clip_by_global_norm(1.0), grads)
    assert state.stats.norm.dtype == jnp.float64
    np.testing.assert_allclose(updates["w"], [0.6, 0.8], rtol=1e-12)


@pytest.mark.parametrize("value", [-1.0, math.nan])
def test_global_bad_threshold(value):
  with pytest.raises(ValueError, match="max_norm"):
    oc.clip_by_global_norm(value)


def test_global_bad_arguments():
  with pytest.raises(TypeError, match="max_norm"):
    oc.clip_by_global_norm("1.0")
  with pytest.raises(ValueError, match="ord"):
    oc.clip_by_global_norm(1.0, ord=0)
  with pytest.raises(ValueError, match="ord"):
    oc.clip_by_global_norm(1.0, ord="fro")
  with pytest.raises(ValueError, match="scalar"):
    oc.clip_by_global_norm(jnp.ones(2))
  tx = oc.clip_by_global_norm(1.0)
  grads = {"ids": jnp.ones(2, jnp.int32)}
  with pytest.raises(TypeError, match=r"\['ids'\]"):
    tx.update(grads, tx.init({"ids": jnp.ones(2)}))


def test_scale_fuses_into_adamw():
  """The clip writes no gradient-sized array of its own in an AdamW step.

  Counted in the compiled program: the kernels whose output holds a
  gradient-sized array. AdamW alone writes three (``mu``, ``nu``, the new
  parameters); a scale that XLA does not fuse into them adds a fourth, as
  ``optax.clip_by_global_norm``'s divide-and-select form does, which the
  test checks too, so that the count can tell the difference.
  """
  if tuple(int(v) for v in jax.__version__.split(".")[:2]) < (0, 10):
    # Fusion is XLA's decision: with jax 0.8.2 every clipper here, and
    # optax's, adds a gradient-sized write (measured: 4 against AdamW's 3,
    # optax's 5), which later XLA releases fuse away.
    pytest.skip("measured on the fusion decisions of jax 0.10")
  params = {"w": jnp.ones((256, 256)), "b": jnp.ones(256)}

  def writes(opt):
    state = opt.init(params)

    def step(grads, state, params):
      updates, state = opt.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    hlo = jax.jit(step).lower(params, state, params).compile().as_text()
    entry = hlo.split("ENTRY")[1]
    return sum(1 for line in entry.splitlines()
               if " fusion(" in line
               and "f32[256,256]" in line.split(" fusion(")[0])

  base = writes(optax.adamw(1e-3))
  for clip in (oc.clip_by_global_norm(1.0), oc.clip_by_norm(1.0),
               oc.zclip(), oc.clip_by_quantile(), oc.clip_by_value(1.0)):
    assert writes(optax.chain(clip, optax.adamw(1e-3))) == base, clip
  assert writes(optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(1e-3))) == base + 1


# ----------------------------------------------------------------------------
# clip_by_global_norm(..., mask=...): the norm of all, scale the chosen.


@pytest.mark.parametrize(**helpers.JIT)
def test_mask_matches_numpy_reference(jitted):
  grads = grads_tree(scale=3.0)
  mask = {"dense": {"kernel": False, "bias": True}, "conv": True}
  tx = oc.clip_by_global_norm(2.0, mask=mask)
  updates, state = helpers.maybe_jit(tx.update, jitted)(grads, tx.init(grads))
  norm = helpers.np_norm(grads)  # Of every leaf, chosen or not.
  factor = 2.0 / norm
  np.testing.assert_allclose(updates["dense"]["bias"],
                             f64(grads)["dense"]["bias"] * factor, rtol=1e-6)
  np.testing.assert_allclose(updates["conv"], f64(grads)["conv"] * factor,
                             rtol=1e-6)
  np.testing.assert_array_equal(updates["dense"]["kernel"],
                                grads["dense"]["kernel"])
  np.testing.assert_allclose(state.stats.norm, norm, rtol=1e-6)
  np.testing.assert_allclose(state.stats.scale, factor, rtol=1e-6)
  assert bool(state.stats.clipped)
  # The chosen leaves are those of the clip without mask, bit for bit.
  full, _ = helpers.maybe_jit(functools.partial(
      apply, oc.clip_by_global_norm(2.0)), jitted)(grads)
  np.testing.assert_array_equal(updates["dense"]["bias"],
                                full["dense"]["bias"])
  np.testing.assert_array_equal(updates["conv"], full["conv"])


def _with_empty_leaves(grads):
  return dict(grads, skip=None, masked=optax.MaskedNode())


@pytest.mark.parametrize("mask", [
    {"dense": True, "conv": False, "skip": True, "masked": True},
    lambda u: jax.tree.map(lambda x: x.ndim != 4, u),
], ids=["prefix", "callable"])
def test_mask_prefix_callable_none_and_masked_leaves(mask):
  grads = _with_empty_leaves(grads_tree(scale=3.0))
  full, _ = apply(oc.clip_by_global_norm(1.0), grads)
  updates, _ = apply(oc.clip_by_global_norm(1.0, mask=mask), grads)
  chex.assert_trees_all_equal(updates["dense"], full["dense"])
  np.testing.assert_array_equal(updates["conv"], grads["conv"])
  assert updates["skip"] is None
  assert isinstance(updates["masked"], optax.MaskedNode)


@pytest.mark.parametrize("mask", [True, False])
def test_mask_all_or_nothing(mask):
  grads = _with_empty_leaves(grads_tree(scale=3.0))
  want = apply(oc.clip_by_global_norm(1.0), grads)[0] if mask else grads
  updates, state = apply(oc.clip_by_global_norm(1.0, mask=mask), grads)
  chex.assert_trees_all_equal(updates, want)
  np.testing.assert_allclose(state.stats.norm, helpers.np_norm(
      {k: v for k, v in grads.items() if k in ("dense", "conv")}), rtol=1e-6)


@pytest.mark.slow
def test_mask_muon_leaves_bit_for_bit():
  # Before optax.contrib.muon: its matrix leaves are orthogonalised (their
  # scale discarded), so only the Adam-handled leaves are scaled. Muon's
  # leaves come out as without the clip, bit for bit, step after step; the
  # state records the norm of all the gradients.
  rng = np.random.default_rng(0)
  params = {"w1": jnp.asarray(rng.standard_normal((8, 16)), jnp.float32),
            "b1": jnp.zeros(16), "w2": jnp.asarray(
                rng.standard_normal((16, 4)), jnp.float32),
            "b2": jnp.zeros(4), "scale": jnp.ones(())}
  adam_leaves = lambda u: jax.tree.map(lambda x: x.ndim != 2, u)  # noqa: E731
  clipped = optax.chain(oc.clip_by_global_norm(1.0, mask=adam_leaves),
                        optax.contrib.muon(0.02))
  plain = optax.contrib.muon(0.02)
  step_c, step_p = jax.jit(clipped.update), jax.jit(plain.update)
  sc, sp = clipped.init(params), plain.init(params)
  for i in range(3):
    grads = jax.tree.map(lambda p, i=i: jnp.asarray(
        rng.standard_normal(p.shape) * 10.0 ** i, jnp.float32), params)
    uc, sc = step_c(grads, sc, params)
    up, sp = step_p(grads, sp, params)
    for k in ("w1", "w2"):
      np.testing.assert_array_equal(uc[k], up[k])
    np.testing.assert_allclose(sc[0].stats.norm, optax.global_norm(grads),
                               rtol=1e-6)
    assert bool(sc[0].stats.clipped)
  clip_out, _ = jax.jit(oc.clip_by_global_norm(1.0, mask=adam_leaves)
                        .update)(grads, oc.clip_by_global_norm(1.0).init(
                            params))
  n = helpers.np_norm(grads)
  for k in ("b1", "b2", "scale"):
    np.testing.assert_allclose(clip_out[k], f64(grads)[k] / n, rtol=1e-6)
  for k in ("w1", "w2"):
    np.testing.assert_array_equal(clip_out[k], grads[k])


def test_mask_sharded_updates_match_one_device():
  n = jax.device_count()
  if n < 2:
    pytest.skip("needs several devices (conftest gives 8 host devices)")
  mesh = jax.make_mesh((n,), ("data",))
  rng = np.random.default_rng(1)
  grads = {"w": jnp.asarray(rng.standard_normal((2 * n, 3)), jnp.float32),
           "b": jnp.asarray(rng.standard_normal(2 * n), jnp.float32)}
  split = jax.sharding.NamedSharding(mesh, jax.P("data"))
  tx = oc.clip_by_global_norm(1.0, mask={"w": False, "b": True})
  step = jax.jit(tx.update)
  want, want_state = step(grads, tx.init(grads))
  got, state = step(jax.device_put(grads, split), tx.init(grads))
  np.testing.assert_array_equal(got["w"], grads["w"])
  np.testing.assert_allclose(got["b"], want["b"], rtol=1e-6)
  np.testing.assert_allclose(state.stats.norm, want_state.stats.norm,
                             rtol=1e-6)


def test_mask_errors():
  grads = grads_tree()
  with pytest.raises(TypeError, match="mask"):
    oc.clip_by_global_norm(1.0, mask={"dense": 1, "conv": True})
  with pytest.raises(TypeError, match="mask"):
    oc.clip_by_global_norm(1.0, mask={})
  with pytest.raises(TypeError, match="mask"):
    oc.clip_by_global_norm(1.0, mask=jnp.array(True))
  with pytest.raises(ValueError, match="mask"):
    apply(oc.clip_by_global_norm(1.0, mask={"dense": True}), grads)
  with pytest.raises(TypeError, match="mask"):
    apply(oc.clip_by_global_norm(1.0, mask=lambda u: jax.tree.map(
        lambda x: jnp.ndim(x) > 1, u) | {"conv": jnp.array(True)}), grads)


# ----------------------------------------------------------------------------
# The 0.4 names: the old keywords say which name replaced them.


@pytest.mark.parametrize("factory, old, new", [
    (oc.clip_by_global_norm, {"where": {"w": True}}, "mask"),
    (oc.clip_by_global_norm, {"where": None}, "mask"),
    (oc.clip_by_value, {"stats": True}, "full_stats"),
    (oc.clip_by_value, {"stats": False}, "full_stats"),
], ids=["where", "where_none", "stats", "stats_false"])
def test_old_keywords_name_the_new_one(factory, old, new):
  (name,) = old
  with pytest.raises(TypeError, match=rf"\b{name}\b.*\b{new}\b"):
    factory(1.0, **old)


def test_clip_by_value_min_value_is_keyword_only():
  with pytest.raises(TypeError, match="positional"):
    oc.clip_by_value(1.0, -1.0)
  # As a keyword it is the lower bound.
  updates, _ = apply(oc.clip_by_value(1.0, min_value=-0.5),
                     jnp.asarray([-3.0, 3.0]))
  np.testing.assert_array_equal(updates, np.float32([-0.5, 1.0]))


# ----------------------------------------------------------------------------
# clip_by_norm.


@pytest.mark.parametrize(**helpers.JIT)
def test_leaf_matches_numpy_reference(jitted):
  grads = grads_tree(scale=0.5)
  tx = oc.clip_by_norm(1.5, leaf_norms=True)
  updates, state = helpers.maybe_jit(tx.update, jitted)(grads, tx.init(grads))
  norms = [np.linalg.norm(g) for g in jax.tree.leaves(f64(grads))]
  np.testing.assert_allclose(state.stats.norm, max(norms), rtol=1e-6)
  np.testing.assert_allclose(state.stats.scale, min(1.0, 1.5 / max(norms)),
                             rtol=1e-6)
  np.testing.assert_allclose(state.stats.frac_clipped,
                             np.mean(np.asarray(norms) > 1.5), rtol=1e-6)
  got = dict(jax.tree_util.tree_leaves_with_path(updates))
  got_norms = dict(jax.tree_util.tree_leaves_with_path(state.stats.leaf_norms))
  for path, g in jax.tree_util.tree_leaves_with_path(f64(grads)):
    n = np.linalg.norm(g)
    np.testing.assert_allclose(got[path], g * min(1.0, 1.5 / n), rtol=1e-6)
    np.testing.assert_allclose(got_norms[path], n, rtol=1e-6)


@pytest.mark.parametrize("axis", [0, -1, (0, 1), (1, 0)])
def test_leaf_axis_matches_tf_semantics(axis):
  """Each slice along the kept axes is clipped by its own norm."""
  rng = np.random.default_rng(4)
  g = rng.standard_normal((6, 4, 3)).astype(np.float32) * 2
  updates, state = apply(oc.clip_by_norm(1.0, axis=axis, leaf_norms=True),
                         {"k": jnp.asarray(g)})
  axes = (axis,) if isinstance(axis, int) else axis
  n = np.sqrt(np.sum(g.astype(np.float64) ** 2, axis=axes, keepdims=True))
  want = g * np.minimum(1.0, 1.0 / n)
  np.testing.assert_allclose(updates["k"], want, rtol=1e-6)
  leaf_norms = state.stats.leaf_norms["k"]
  np.testing.assert_allclose(leaf_norms, np.squeeze(n, axes), rtol=1e-6)
  assert leaf_norms.shape == np.squeeze(n, axes).shape
  np.testing.assert_allclose(state.stats.norm, np.max(n), rtol=1e-6)
  np.testing.assert_allclose(state.stats.scale, min(1.0, 1.0 / np.max(n)),
                             rtol=1e-6)
  np.testing.assert_allclose(state.stats.frac_clipped, np.mean(n > 1.0),
                             rtol=1e-6)


def test_leaf_rms_matches_optax_block_rms():
  grads = grads_tree(scale=3.0)

  def both(t):
    return (apply(oc.clip_by_norm(t, ord="rms"), grads)[0],
            apply(optax.clip_by_block_rms(t), grads)[0])

  ours, theirs = jax.jit(jax.vmap(both))(jnp.asarray([0.5, 2.0, 10.0]))
  chex.assert_trees_all_close(ours, theirs, rtol=1e-6)


def _leaf_norm_dict(tree):
  return {jax.tree_util.keystr(p): helpers.np_norm(x)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_leaf_pytree_prefix_threshold():
  grads = grads_tree(scale=3.0)
  updates, state = apply(oc.clip_by_norm({"dense": 1.0, "conv": 0.25}), grads)
  for path, n in _leaf_norm_dict(updates).items():
    want = 0.25 if "conv" in path else 1.0
    np.testing.assert_allclose(n, want, rtol=1e-5)
  np.testing.assert_allclose(state.stats.threshold["conv"], 0.25)
  # Schedules may sit in the tree too.
  tx = oc.clip_by_norm({"dense": optax.constant_schedule(0.5), "conv": 1.0})
  updates, _ = jax.jit(lambda g: apply(tx, g))(grads)
  np.testing.assert_allclose(helpers.np_norm(updates["dense"]["bias"]), 0.5,
                             rtol=1e-5)


def test_leaf_mismatched_threshold_tree():
  tx = oc.clip_by_norm({"dense": 1.0, "nope": 1.0})
  with pytest.raises(ValueError, match="max_norm tree does not match"):
    apply(tx, grads_tree())


@pytest.mark.slow
def test_leaf_inject_hyperparams():
  grads = grads_tree(scale=3.0)
  tx = optax.inject_hyperparams(oc.clip_by_norm, static_args="ord")(
      max_norm=1.0, ord="rms")
  updates, _ = jax.jit(tx.update)(grads, tx.init(grads))
  theirs, _ = optax.clip_by_block_rms(1.0).update(grads, None)
  chex.assert_trees_all_close(updates, theirs, rtol=1e-6)
  # Without static_args, ord is injected as a traced array and still works:
  # one compiled step serves every ord.
  tx = optax.inject_hyperparams(oc.clip_by_norm)(max_norm=1.0, ord=1.0)
  state = tx.init(grads)
  step = jax.jit(tx.update)
  for ord in (1, 2, 3, math.inf):
    state.hyperparams["ord"] = jnp.asarray(ord, jnp.float32)
    updates, _ = step(grads, state)
    ours, _ = apply(oc.clip_by_norm(1.0, ord=ord), grads)
    chex.assert_trees_all_close(updates, ours, rtol=1e-5)


def test_leaf_bad_axis():
  with pytest.raises(ValueError, match=r"axis=1.*\['dense'\]\['bias'\]"):
    apply(oc.clip_by_norm(1.0, axis=1), grads_tree())


@pytest.mark.parametrize("axis", [None, 0])
def test_leaf_clip_of_many_same_shape_leaves(axis):
  # Leaves of one shape are clipped as a group: each must get its own factor.
  rng = np.random.default_rng(5)
  grads = {f"l{i}": jnp.asarray(rng.normal(size=(4, 3)) * (i + 1) / 4,
                                jnp.float32) for i in range(7)}
  grads["odd"] = jnp.asarray(rng.normal(size=5) * 3, jnp.float32)
  thresholds = {k: float(1 + i % 3) for i, k in enumerate(grads)}
  tx = oc.clip_by_norm(thresholds, axis=axis, leaf_norms=True)
  updates, state = jax.jit(tx.update)(grads, tx.init(grads))
  for k, g in grads.items():
    x = np.asarray(g, np.float64)
    red = None if axis is None or x.ndim == 1 else axis
    n = np.sqrt(np.sum(x ** 2, axis=red, keepdims=red is not None))
    want = x * np.minimum(1, thresholds[k] / n)
    np.testing.assert_allclose(np.asarray(updates[k]), want, rtol=1e-5,
                               err_msg=k)
    np.testing.assert_allclose(np.asarray(state.stats.leaf_norms[k]),
                               np.squeeze(n) if red is not None else n,
                               rtol=1e-5, err_msg=k)


# ----------------------------------------------------------------------------
# clip_by_value.


@pytest.mark.parametrize(**helpers.JIT)
def test_value_matches_optax_clip(jitted):
  grads = grads_tree(scale=2.0)
  tx = oc.clip_by_value(1.0, full_stats=True)
  updates, state = helpers.maybe_jit(tx.update, jitted)(grads, tx.init(grads))
  theirs, _ = optax.clip(1.0).update(grads, None)
  chex.assert_trees_all_equal(updates, theirs)
  flat = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(grads)])
  np.testing.assert_allclose(state.stats.frac_clipped,
                             np.mean(np.abs(flat) > 1.0), rtol=1e-6)
  np.testing.assert_allclose(state.stats.norm, helpers.np_norm(grads),
                             rtol=1e-6)
  np.testing.assert_allclose(
      state.stats.scale, helpers.np_norm(updates) / helpers.np_norm(grads),
      rtol=1e-5)
  assert bool(state.stats.clipped)
  assert int(state.stats.num_clipped) == 1


def test_value_asymmetric_bounds():
  g = jnp.asarray([-3.0, -0.5, 0.2, 4.0])
  updates, state = apply(
      oc.clip_by_value(1.0, min_value=-0.25, full_stats=True), g)
  np.testing.assert_array_equal(updates, np.float32([-0.25, -0.25, 0.2, 1.0]))
  np.testing.assert_allclose(state.stats.frac_clipped, 0.75)


def test_value_below_threshold_unchanged():
  g = grads_tree()
  updates, state = apply(oc.clip_by_value(100.0, full_stats=True), g)
  chex.assert_trees_all_equal(updates, g)
  assert not bool(state.stats.clipped)
  assert float(state.stats.scale) == 1.0


def test_value_dtypes_and_schedule():
  g = {"h": jnp.asarray([70000.0, -2.0], jnp.float32).astype(jnp.bfloat16),
       "f": jnp.asarray([300.0], jnp.float16)}
  tx = oc.clip_by_value(lambda step: 10.0 * (step + 1), full_stats=True)
  state = tx.init(g)
  updates, state = tx.update(g, state)
  chex.assert_trees_all_equal_dtypes(updates, g)
  np.testing.assert_array_equal(np.asarray(updates["h"], np.float32),
                                [10.0, -2.0])
  updates, state = tx.update(g, state)
  np.testing.assert_array_equal(np.asarray(updates["f"], np.float32), [20.0])
  assert np.isfinite(state.stats.norm)
  assert float(state.stats.threshold) == 20.0


@pytest.mark.slow
def test_value_inject_hyperparams():
  grads = grads_tree(scale=2.0)
  tx = optax.inject_hyperparams(oc.clip_by_value)(max_value=1.0)
  state = tx.init(grads)
  state.hyperparams["max_value"] = jnp.asarray(0.5)
  updates, state = jax.jit(tx.update)(grads, state)
  chex.assert_trees_all_equal(updates, optax.clip(0.5).update(grads, None)[0])


def test_value_bad_arguments():
  with pytest.raises(ValueError, match="max_value"):
    oc.clip_by_value(-1.0)
  with pytest.raises(ValueError, match="min_value=2.0 is above"):
    oc.clip_by_value(1.0, min_value=2.0)
  with pytest.raises(ValueError, match="max_value"):
    oc.clip_by_value(math.nan)
  oc.clip_by_value(-1.0, min_value=-2.0)  # Both negative is a valid range.
  with pytest.raises(ValueError, match=r"min_value\['w'\]=2.0 is above"):
    oc.clip_by_value({"w": 1.0}, min_value={"w": 2.0})
  with pytest.raises(ValueError, match=r"min_value\['b'\]=3.0 is above"):
    oc.clip_by_value(2.0, min_value={"w": 0.0, "b": 3.0})
  with pytest.raises(TypeError, match="full_stats"):
    oc.clip_by_value(1.0, full_stats="yes")


def test_value_default_keeps_only_free_statistics():
  g = jnp.asarray([-3.0, 0.5, 2.0])
  updates, state = apply(oc.clip_by_value(1.0), g)
  np.testing.assert_array_equal(updates, np.float32([-1.0, 0.5, 1.0]))
  assert int(state.stats.count) == 1
  assert float(state.stats.threshold) == 1.0
  for field in ("norm", "scale", "clipped", "frac_clipped", "num_clipped",
                "leaf_norms"):
    assert getattr(state.stats, field) is None, field


def test_value_run_time_bounds_are_made_safe():
  g = jnp.asarray([-3.0, 0.5, 2.0])
  # A schedule that goes negative or NaN acts as 0: no sign flip, no NaN.
  # One program: the schedule's value is a traced argument.
  updates, states = helpers.sweep(
      lambda bad: oc.clip_by_value(lambda step: bad), [-1.0, math.nan], g)
  np.testing.assert_array_equal(updates, np.zeros((2, 3), np.float32))
  np.testing.assert_array_equal(states.stats.threshold, [0.0, 0.0])
  # A run-time min_value above max_value is lowered to it.
  updates, _ = apply(oc.clip_by_value(lambda s: 1.0,
                                      min_value=lambda s: 2.0), g)
  np.testing.assert_array_equal(updates, np.ones(3, np.float32))


# ----------------------------------------------------------------------------
# Properties. The transforms run jitted, with the threshold as an argument, on
# a few fixed shapes, so that each example reuses a compiled program.

finite32 = st.floats(-1e4, 1e4, width=32, allow_subnormal=False)
SHAPES = [(7,), (3, 4), (2, 5)]
tree_strategy = st.tuples(*[hnp.arrays(np.float32, s, elements=finite32)
                            for s in SHAPES])
thresholds = st.floats(1e-3, 1e3).map(lambda t: float(np.float32(t)))
PROPS = settings(max_examples=40, deadline=None)


@functools.cache
def jitted_clip(name, ord, axis=None):
  def run(grads, t):
    if name == "global":
      tx = oc.clip_by_global_norm(t, ord=ord)
    elif name == "leaf":
      tx = oc.clip_by_norm(t, ord=ord, axis=axis, leaf_norms=True)
    else:
      tx = oc.clip_by_value(t, full_stats=True)
    updates, state = apply(tx, grads)
    after = (oc.global_norm(updates, ord=ord) if name == "global" else
             _norms.leaf_norms(updates, ord, axis=axis) if name == "leaf" else
             None)
    return updates, state, after
  return jax.jit(run)


@PROPS
@given(tree_strategy, thresholds, st.sampled_from([1, 2, math.inf, "rms"]))
def test_global_clip_properties(leaves, t, ord):
  grads = [jnp.asarray(x) for x in leaves]
  clip = jitted_clip("global", ord)
  updates, state, after = clip(grads, t)
  norm = float(state.stats.norm)
  assert after <= t * (1 + 1e-5)  # Norm at most the threshold.
  if norm <= t:  # Identity below the threshold.
    chex.assert_trees_all_equal(updates, grads)
  else:  # Direction kept: a positive multiple of the input.
    g = np.concatenate([np.ravel(x) for x in leaves]).astype(np.float64)
    u = np.concatenate([np.ravel(x) for x in updates]).astype(np.float64)
    np.testing.assert_allclose(u, g * (t / norm), rtol=1e-5, atol=1e-30)
  again, _, _ = clip(updates, t)  # Idempotent.
  chex.assert_trees_all_close(again, updates, rtol=1e-5, atol=1e-30)
  assert bool(state.stats.clipped) == (norm > t)


@PROPS
@given(tree_strategy, thresholds, st.sampled_from([2, 1, "rms"]),
       st.sampled_from([None, 0, -1]))
@pytest.mark.slow
def test_per_leaf_clip_properties(leaves, t, ord, axis):
  grads = [jnp.asarray(x) for x in leaves]
  clip = jitted_clip("leaf", ord, axis)
  updates, state, after = clip(grads, t)
  assert bool(state.stats.clipped) == (float(state.stats.norm) > t)
  for g, u, n, a in zip(grads, updates, state.stats.leaf_norms, after):
    assert np.all(np.asarray(a) <= t * (1 + 1e-5))
    below = np.broadcast_to(np.reshape(np.asarray(n) <= t, a.shape), g.shape)
    np.testing.assert_array_equal(np.asarray(u)[below], np.asarray(g)[below])
  again, _, _ = clip(updates, t)
  chex.assert_trees_all_close(again, updates, rtol=1e-5, atol=1e-30)


@PROPS
@given(tree_strategy, thresholds)
def test_value_clip_properties(leaves, t):
  clip = jitted_clip("value", None)
  updates, state, _ = clip([jnp.asarray(x) for x in leaves], t)
  x = np.concatenate([np.ravel(v) for v in leaves])
  u = np.concatenate([np.ravel(v) for v in updates])
  assert np.all(np.abs(u) <= np.float32(t))
  inside = np.abs(x) <= np.float32(t)
  np.testing.assert_array_equal(u[inside], x[inside])
  assert bool(state.stats.clipped) == bool((~inside).any())
  again, _, _ = clip(updates, t)
  chex.assert_trees_all_equal(again, updates)


# ----------------------------------------------------------------------------
# Statistics through optax's wrappers.


@pytest.mark.parametrize("make, name", [
    (lambda: oc.clip_by_global_norm(1.0), "clip_by_global_norm"),
    (lambda: oc.clip_by_norm(1.0), "clip_by_norm"),
    (lambda: oc.clip_by_value(1.0, full_stats=True), "clip_by_value"),
], ids=["global_norm", "norm", "value"])
@pytest.mark.parametrize("wrap", ["chain", "masked", "multi_transform",
                                  "multi_steps"])
@pytest.mark.slow
def test_stats_through_optax_wrappers(make, name, wrap):
  params = {"emb": jnp.ones((4, 3)), "w": jnp.ones((3, 2))}
  grads = jax.tree.map(lambda p: 5 * p, params)
  opt = {
      "chain": lambda: optax.chain(make(), optax.adam(1e-3)),
      "masked": lambda: optax.masked(make(), {"emb": True, "w": False}),
      "multi_transform": lambda: optax.multi_transform(
          {"clip": make(), "sgd": optax.sgd(0.1)}, {"emb": "clip", "w": "sgd"}),
      "multi_steps": lambda: optax.MultiSteps(
          optax.chain(make(), optax.sgd(0.1)), every_k_schedule=1),
  }[wrap]()
  _, state = jax.jit(opt.update)(grads, opt.init(params), params)
  stats = oc.clip_stats(state)
  assert int(stats[f"{name}/count"]) == 1
  assert bool(stats[f"{name}/clipped"])
  assert int(stats[f"{name}/num_clipped"]) == 1
  np.testing.assert_allclose(optax.tree.get(state, "num_clipped"), 1)


# ----------------------------------------------------------------------------
# A global norm computed elsewhere: update(..., global_norm=...).


def _bits_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_supplied_global_norm_gives_the_same_bits():
  rng = np.random.default_rng(5)
  grads = {"w": rng.normal(size=(6, 5)).astype(np.float32),
           "b": rng.normal(size=(5,)).astype(np.float16),
           "s": np.float32(3e37)}  # Takes the overflow-safe path.
  small = {k: v * v.dtype.type(1e-37) if k == "s" else v
           for k, v in grads.items()}
  mask = {"w": True, "b": False, "s": True}

  @jax.jit
  def run(g):
    out = []
    for p, make in (
        (2, lambda **k: oc.clip_by_global_norm(1.0, **k)),
        (1, lambda **k: oc.clip_by_global_norm(0.5, ord=1, mask=mask, **k))):
      own = make(reproducible=True)
      plain = make()
      state = own.init(g)
      parts = oc.norm_parts(g, ord=p)
      out.append((own.update(g, state, g),
                  plain.update(g, plain.init(g), g, global_norm=parts),
                  plain.update(g, plain.init(g), g),
                  plain.update(g, plain.init(g), g,
                               global_norm=oc.global_norm(g, ord=p))))
    chained = optax.chain(oc.clip_by_global_norm(1.0), optax.adam(0.1))
    by_chain = chained.update(g, chained.init(g), g,
                              global_norm=oc.norm_parts(g))
    alone = optax.chain(oc.clip_by_global_norm(1.0, reproducible=True),
                        optax.adam(0.1))
    return out, by_chain, alone.update(g, alone.init(g), g)

  for tree in (grads, small):
    out, by_chain, alone = run(tree)
    for own, with_parts, plain, with_float in out:
      _bits_equal(own, with_parts)  # parts == reproducible, bit for bit
      if tree is small:  # the hot path: a float norm is the pair (1, norm)
        _bits_equal(plain, with_float)
      np.testing.assert_allclose(own[1].stats.norm, plain[1].stats.norm,
                                 rtol=1e-6)
    _bits_equal(by_chain, alone)
  np.testing.assert_allclose(out[0][0][1].stats.norm,
                             helpers.np_norm(small), rtol=1e-6)


def test_supplied_global_norm_errors():
  clip = oc.clip_by_global_norm(1.0)
  g = {"w": jnp.ones(3)}
  with pytest.raises(ValueError, match="ord"):
    clip.update(g, clip.init(g), global_norm=oc.norm_parts(g, ord=1))
  with pytest.raises(TypeError, match="global_norm"):
    clip.update(g, clip.init(g), global_norm=jnp.ones(2))
  with pytest.raises(TypeError, match="reproducible"):
    oc.clip_by_global_norm(1.0, reproducible=1)
