"""per_example_clip and clipped_grad: NumPy and optax references, properties."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optaxclip as oc
from optaxclip import _norms
from tests import _dp_references as ref
from tests._helpers import JIT, maybe_jit, np_norm


def per_example_tree(batch=6, seed=0, scale=1.0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  # Examples of very different sizes, so that some are clipped and some not.
  sizes = np.geomspace(0.05, 5.0, batch)[rng.permutation(batch)] * scale
  tree = {
      "dense": {"kernel": rng.standard_normal((batch, 4, 3)),
                "bias": rng.standard_normal((batch, 3))},
      "conv": rng.standard_normal((batch, 2, 2, 1, 2)),
  }
  leaves, treedef = jax.tree.flatten(tree)
  norms = np.sqrt(sum(np.sum(x.reshape(batch, -1) ** 2, axis=1)
                      for x in leaves))
  leaves = [x * (sizes / norms).reshape((-1,) + (1,) * (x.ndim - 1))
            for x in leaves]
  return jax.tree.unflatten(treedef, [jnp.asarray(x, dtype) for x in leaves])


def leaves64(tree):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def assert_sums_close(got, want, rtol=1e-6, atol=1e-6):
  for g, w in zip(jax.tree.leaves(got), want):
    np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=rtol,
                               atol=atol)


def diff_norm(a, b):
  """The float64 norm of the difference of two sums (trees)."""
  return np_norm(jax.tree.map(
      lambda x, y: np.asarray(x, np.float64) - np.asarray(y, np.float64), a,
      b))


@functools.partial(jax.jit, static_argnums=3)
def _property_parts(grads, c, mask, gamma):
  """Each example clipped alone (its norm), the sum, and the sum without
  the examples ``mask`` drops; ``gamma``: automatic clipping's, or None."""
  rule = oc.ExampleClip(c, automatic=gamma)

  def alone(g):
    one, _ = oc.per_example_clip(jax.tree.map(lambda x: x[None], g), rule)
    return oc.global_norm(one)

  total, _ = oc.per_example_clip(grads, rule)
  without, _ = oc.per_example_clip(grads, rule, example_mask=mask)
  return jax.vmap(alone)(grads), total, without


# The clipping norm is a traced argument: one compilation serves every value.
_clip = jax.jit(lambda g, c: oc.per_example_clip(g, c))


# ----------------------------------------------------------------------------
# per_example_clip.


@pytest.mark.parametrize(**JIT)
def test_matches_numpy_reference(jitted):
  grads = per_example_tree()
  total, info = maybe_jit(lambda g: oc.per_example_clip(g, 1.0), jitted)(grads)
  want, norms, num_clipped, _ = ref.per_example_clip(leaves64(grads), 1.0)
  assert_sums_close(total, want)
  np.testing.assert_allclose(info.norms, norms, rtol=1e-6)
  assert int(info.num_examples_clipped) == num_clipped
  assert 0 < num_clipped < 6
  assert int(info.num_examples) == 6
  assert int(info.num_nonfinite) == 0
  assert float(info.sensitivity) == 1.0
  assert int(info.batch_size) == 6
  chex.assert_trees_all_equal_structs(total, jax.tree.map(lambda x: x[0],
                                                          grads))


@pytest.mark.parametrize(**JIT)
def test_matches_optax_per_example_global_norm_clip(jitted):
  grads = per_example_tree()
  ours = maybe_jit(lambda g, c: oc.per_example_clip(g, c), jitted)
  theirs = maybe_jit(
      lambda g, c: optax.per_example_global_norm_clip(jax.tree.leaves(g), c),
      jitted)
  for c in (0.0, 0.3, 1.25, math.inf):
    total, info = ours(grads, jnp.float32(c))
    want, num = theirs(grads, jnp.float32(c))
    assert_sums_close(total, [np.asarray(w) for w in want])
    assert int(info.num_examples_clipped) == int(num)


def test_number_example_clip_and_jax_scalar_are_one_rule():
  grads = per_example_tree()
  want = oc.per_example_clip(grads, 1.0)
  for clip in (oc.ExampleClip(1.0), jnp.float32(1.0), 1,
               oc.ExampleClip(jnp.float32(1.0), per_layer=False,
                              normalize=False, automatic=None, nan_safe=True)):
    chex.assert_trees_all_equal(oc.per_example_clip(grads, clip), want)


def test_per_layer_matches_optax_layer_norm_clip():
  grads = per_example_tree(scale=2.0)
  total, info = oc.per_example_clip(grads, oc.ExampleClip(1.5,
                                                          per_layer=True))
  want, _ = optax.per_example_layer_norm_clip(jax.tree.leaves(grads), 1.5,
                                              uniform=True)
  assert_sums_close(total, [np.asarray(w) for w in want])
  t = [1.5 / math.sqrt(3)] * 3
  want64, _, num, _ = ref.per_example_clip(leaves64(grads), 1.5,
                                           layer_thresholds=t)
  assert_sums_close(total, want64)
  assert int(info.num_examples_clipped) == num
  np.testing.assert_allclose(info.sensitivity, 1.5, rtol=1e-6)


def test_per_layer_threshold_tree():
  grads = per_example_tree(scale=2.0)
  thresholds = {"dense": 0.5, "conv": 2.0}  # A prefix of the gradients.
  total, info = oc.per_example_clip(
      grads, oc.ExampleClip(1.0, per_layer=thresholds))
  # Leaf order: conv, dense/bias, dense/kernel. The prefix's leaves are
  # the layers: dense's bias and kernel are clipped as one, by their joint
  # norm, as jax-privacy clips a prefix subtree.
  want, _, num, _ = ref.per_example_clip(
      leaves64(grads), 1.0, layer_thresholds=[2.0, 0.5], layers=[0, 1, 1])
  assert_sums_close(total, want)
  assert int(info.num_examples_clipped) == num
  np.testing.assert_allclose(info.sensitivity, math.sqrt(4.25), rtol=1e-6)


def test_normalize():
  grads = per_example_tree(scale=2.0)
  total, info = oc.per_example_clip(grads, oc.ExampleClip(0.5,
                                                          normalize=True))
  want, _, _, _ = ref.per_example_clip(leaves64(grads), 0.5, normalize=True)
  assert_sums_close(total, want)
  plain, _ = oc.per_example_clip(grads, 0.5)
  chex.assert_trees_all_close(total, jax.tree.map(lambda x: x / 0.5, plain),
                              rtol=1e-6)
  assert float(info.sensitivity) == 1.0


@pytest.mark.parametrize("bad", [0.0, math.inf])
def test_normalize_refuses_a_zero_or_infinite_norm(bad):
  with pytest.raises(ValueError, match="normalize"):
    oc.per_example_clip(per_example_tree(), oc.ExampleClip(bad,
                                                           normalize=True))


@pytest.mark.slow
def test_nan_and_inf_examples_change_only_counters():
  grads = per_example_tree()
  clean_total, clean = oc.per_example_clip(
      jax.tree.map(lambda x: x[2:], grads), 1.0)
  bad = jax.tree.map(lambda x: x.at[0].set(jnp.nan).at[1, ..., 0].set(
      jnp.inf), grads)
  total, info = _clip(bad, 1.0)
  chex.assert_trees_all_equal(total, clean_total)
  assert int(info.num_nonfinite) == 2
  assert int(info.num_examples) == 4
  assert int(info.num_examples_clipped) == int(clean.num_examples_clipped)
  assert np.isnan(info.norms[0]) and np.isinf(info.norms[1])
  np.testing.assert_array_equal(info.included, [0, 0, 1, 1, 1, 1])
  # optax lets the NaN example through (its scale becomes 1).
  optax_total, _ = optax.per_example_global_norm_clip(bad, 1.0)
  assert not np.all(np.isfinite(optax_total["conv"]))
  # Without nan_safe, the NaN propagates, and is still counted.
  unsafe, info = oc.per_example_clip(bad, oc.ExampleClip(1.0, nan_safe=False))
  assert np.all(np.isnan(unsafe["conv"]))
  assert int(info.num_nonfinite) == 2


def test_padding_example_changes_only_counters():
  grads = per_example_tree()
  mask = jnp.array([True, True, False, True, True, False])
  padded = jax.tree.map(lambda x: x.at[2].set(jnp.nan).at[5].set(1e3), grads)
  total, info = oc.per_example_clip(padded, 1.0, example_mask=mask)
  kept = jax.tree.map(lambda x: x[np.asarray(mask)], grads)
  want, want_info = oc.per_example_clip(kept, 1.0)
  chex.assert_trees_all_equal(total, want)
  assert int(info.num_examples) == 4
  assert int(info.num_nonfinite) == 0  # The NaN was padding.
  assert int(info.num_examples_clipped) == int(want_info.num_examples_clipped)
  assert int(info.batch_size) == 6


@pytest.mark.parametrize("scale", [1e30, 1e37, 1e-30, 1e-33])
def test_float32_overflow_and_underflow(scale):
  """Squares overflow or underflow float32; the norms and sums do not."""
  x = np.random.default_rng(1).standard_normal((4, 50)) * scale
  grads = {"a": jnp.asarray(x, jnp.float32)}
  x32 = np.asarray(grads["a"], np.float64)  # What float32 holds.
  total, info = _clip(grads, jnp.float32(2.0 * scale))
  want, norms, num, _ = ref.per_example_clip([x32], 2.0 * scale)
  np.testing.assert_allclose(info.norms, norms, rtol=1e-5)
  assert int(info.num_examples_clipped) == num
  np.testing.assert_allclose(np.asarray(total["a"], np.float64), want[0],
                             rtol=2e-5, atol=1e-44)
  assert int(info.num_nonfinite) == 0


@pytest.mark.slow
def test_bfloat16_norms_accumulate_in_float32():
  grads = per_example_tree(batch=8, scale=1e3, dtype=jnp.bfloat16)
  total, info = oc.per_example_clip(grads, 500.0)
  assert info.norms.dtype == jnp.float32
  chex.assert_trees_all_equal_dtypes(total, jax.tree.map(lambda x: x[0],
                                                         grads))
  want, norms, num, _ = ref.per_example_clip(leaves64(grads), 500.0)
  np.testing.assert_allclose(info.norms, norms, rtol=1e-6)
  assert int(info.num_examples_clipped) == num
  assert_sums_close(total, want, rtol=1e-2, atol=1e-2)  # bfloat16 output.


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), c=st.floats(1e-3, 1e3),
       log_scale=st.floats(-3, 3), drop=st.integers(0, 4))
def test_properties_bounded_norm_and_sensitivity(seed, c, log_scale, drop):
  grads = per_example_tree(batch=5, seed=seed, scale=10.0 ** log_scale)
  singles, total, without = _property_parts(grads, jnp.float32(c),
                                            jnp.arange(5) != drop, None)
  # Each example's clipped gradient (a batch of one) has norm <= c.
  assert float(np.max(singles)) <= c * (1 + 1e-5)
  # Removing one example moves the sum by at most c.
  assert diff_norm(total, without) <= c * (1 + 1e-5)


@pytest.mark.parametrize("c", [0.5, 2.0])
def test_traced_threshold_under_jit(c):
  grads = per_example_tree()
  total, _ = _clip(grads, jnp.float32(c))
  want, _, _, _ = ref.per_example_clip(leaves64(grads), c)
  assert_sums_close(total, want)


_TREE = per_example_tree()


@pytest.mark.parametrize("call, error, match", [
    (lambda: oc.per_example_clip({"a": jnp.ones((3, 2)), "b": jnp.ones((4,))},
                                 1.0), ValueError, "leading"),
    (lambda: oc.per_example_clip(_TREE, -1.0), ValueError, "max_norm"),
    (lambda: oc.per_example_clip(_TREE, oc.ExampleClip(-1.0)), ValueError,
     "max_norm"),
    (lambda: oc.per_example_clip(_TREE, 1.0, example_mask=jnp.ones(5, bool)),
     ValueError, "example_mask"),
    (lambda: oc.per_example_clip(_TREE, 1.0, example_mask=jnp.ones(6)),
     TypeError, "boolean"),
    (lambda: oc.per_example_clip({"a": jnp.ones((3, 2), jnp.int32)}, 1.0),
     TypeError, "floating"),
    (lambda: oc.per_example_clip(_TREE, optax.constant_schedule(1.0)),
     TypeError, "schedule"),
    (lambda: oc.per_example_clip(
        _TREE, oc.ExampleClip(optax.constant_schedule(1.0))), TypeError,
     "schedule"),
    (lambda: oc.per_example_clip(
        _TREE, oc.ExampleClip(1.0, per_layer={"x": 1.0, "y": 2.0})),
     ValueError, "per_layer"),
    (lambda: oc.per_example_clip(_TREE, "1.0"), TypeError,
     "number, a JAX scalar or an oc.ExampleClip"),
    (lambda: oc.per_example_clip(_TREE, True), TypeError, "max_norm"),
    (lambda: oc.per_example_clip(_TREE, oc.quantile_norm()), TypeError,
     "ExampleClip"),
    (lambda: oc.per_example_clip(_TREE, oc.ExampleClip(oc.quantile_norm())),
     TypeError, "quantile_norm.*belongs to oc.dp_aggregate"),
    (lambda: oc.per_example_clip(_TREE, oc.ExampleClip(1.0, normalize=1)),
     TypeError, "normalize must be True or False"),
    (lambda: oc.per_example_clip(_TREE, oc.ExampleClip(1.0, nan_safe=None)),
     TypeError, "nan_safe must be True or False"),
])
def test_errors(call, error, match):
  with pytest.raises(error, match=match):
    call()


@pytest.mark.parametrize("old, match", [
    ("max_norm", r"max_norm= is now clip="),
    ("per_layer", r"per_layer= moved into the rule: clip=oc\.ExampleClip"
     r"\(max_norm, per_layer=\.\.\.\)"),
    ("normalize", r"normalize= moved into the rule: clip=oc\.ExampleClip"),
    ("automatic", r"automatic= moved into the rule: clip=oc\.ExampleClip"),
    ("nan_safe", r"nan_safe= moved into the rule: clip=oc\.ExampleClip"),
])
def test_old_keywords_name_their_replacement(old, match):
  with pytest.raises(TypeError, match="per_example_clip: " + match):
    oc.per_example_clip(_TREE, **{old: 1.0})
  with pytest.raises(TypeError, match="clipped_grad: " + match):
    oc.clipped_grad(lambda w, x: w * x, **{old: 1.0})
  with pytest.raises(TypeError, match="clipped_grad: return_norms= was"
                     " removed: the function always returns the"
                     " PerExampleInfo last"):
    oc.clipped_grad(lambda w, x: w * x, clip=1.0, return_norms=True)


# ----------------------------------------------------------------------------
# clipped_grad on three small models.


def mlp_init(rng):
  return {"w1": rng.standard_normal((6, 16)) * 0.5, "b1": np.zeros(16),
          "w2": rng.standard_normal((16, 3)) * 0.5, "b2": np.zeros(3)}


def mlp_apply(p, x):
  return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def cnn_init(rng):
  return {"k": rng.standard_normal((3, 3, 1, 4)) * 0.5, "kb": np.zeros(4),
          "w": rng.standard_normal((4, 3)) * 0.5, "b": np.zeros(3)}


def cnn_apply(p, x):
  y = jax.lax.conv_general_dilated(x, p["k"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  y = jax.nn.relu(y + p["kb"]).mean(axis=(1, 2))
  return y @ p["w"] + p["b"]


def attention_init(rng):
  return {n: rng.standard_normal((4, 4)) * 0.5 for n in ("q", "k", "v", "o")} | {
      "head": rng.standard_normal((4, 3)) * 0.5}


def attention_apply(p, x):
  q, k, v = x @ p["q"], x @ p["k"], x @ p["v"]
  a = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / 2.0, axis=-1)
  return ((a @ v) @ p["o"] + x).mean(axis=-2) @ p["head"]


MODELS = {
    "mlp": (mlp_init, mlp_apply, (6,)),
    "cnn": (cnn_init, cnn_apply, (6, 6, 1)),
    "attention": (attention_init, attention_apply, (5, 4)),
}


def model_case(name, batch=10, seed=0, dtype=jnp.float32):
  init, apply, shape = MODELS[name]
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda x: jnp.asarray(x, dtype), init(rng))
  x = jnp.asarray(rng.standard_normal((batch,) + shape) * 2.0, dtype)
  y = jnp.asarray(rng.integers(0, 3, batch))

  def loss(p, x, y):
    logits = apply(p, x).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return loss, params, x, y


def vmap_reference(loss, params, x, y):
  """Per-example gradients the plain way: vmap of grad on batches of one."""
  one = lambda p, xi, yi: loss(p, xi[None], yi[None])  # noqa: E731
  return jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, x, y)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", list(MODELS))
def test_equals_vmap_grad_then_per_example_clip(name):
  loss, params, x, y = model_case(name)
  per_example = vmap_reference(loss, params, x, y)
  # A threshold between the smallest and largest per-example norms.
  c = float(np.median(ref.per_example_clip(leaves64(per_example), 1.0)[1]))
  grad_fn = jax.jit(oc.clipped_grad(loss, clip=c, batch_argnums=(1, 2)))
  total, info = grad_fn(params, x, y)
  want, want_info = oc.per_example_clip(per_example, c)
  chex.assert_trees_all_close(total, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(info.norms, want_info.norms, rtol=1e-5)
  assert int(info.num_examples_clipped) == int(want_info.num_examples_clipped)
  assert 0 < int(info.num_examples_clipped) < 10
  # And the float64 reference on the same per-example gradients.
  want64, norms, _, _ = ref.per_example_clip(leaves64(per_example), c)
  assert_sums_close(total, want64, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(info.norms, norms, rtol=1e-5)


@pytest.mark.slow
def test_clipped_grad_per_layer():
  loss, params, x, y = model_case("attention")
  per_example = vmap_reference(loss, params, x, y)
  layers = {"q": 0.1, "k": 0.1, "v": 0.2, "o": 0.2, "head": 0.3}
  for per_layer in (True, layers):
    rule = oc.ExampleClip(0.5, per_layer=per_layer)
    got, info = oc.clipped_grad(loss, clip=rule, batch_argnums=(1, 2),
                                microbatch_size=4)(params, x, y)
    want, want_info = oc.per_example_clip(per_example, rule)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)
    assert int(info.num_examples_clipped) == int(
        want_info.num_examples_clipped)
    assert int(info.num_examples_clipped) > 0
    np.testing.assert_allclose(info.sensitivity, want_info.sensitivity,
                               rtol=1e-6)
  np.testing.assert_allclose(info.sensitivity, math.sqrt(
      sum(v * v for v in layers.values())), rtol=1e-6)


def test_keep_batch_dim_false():
  loss, params, x, y = model_case("mlp")
  single = lambda p, xi, yi: loss(p, xi[None], yi[None])  # noqa: E731
  a = jax.jit(oc.clipped_grad(single, clip=0.5, batch_argnums=(1, 2),
                              keep_batch_dim=False))(params, x, y)
  b = jax.jit(oc.clipped_grad(loss, clip=0.5, batch_argnums=(1, 2)))(
      params, x, y)
  chex.assert_trees_all_close(a, b, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_microbatched_equals_unbatched(name):
  loss, params, x, y = model_case(name, batch=10)
  mask = jnp.arange(10) != 3

  def aux_loss(p, x, y):
    return loss(p, x, y), {"logits": MODELS[name][1](p, x)}

  full = oc.clipped_grad(aux_loss, has_aux=True, clip=0.5,
                         batch_argnums=(1, 2))
  want, want_aux, want_info = jax.jit(full)(params, x, y, example_mask=mask)
  for size in (1, 3, 4, 5, 10, 16):
    chunked = oc.clipped_grad(aux_loss, has_aux=True, clip=0.5,
                              batch_argnums=(1, 2), microbatch_size=size)
    got, aux, info = jax.jit(chunked)(params, x, y, example_mask=mask)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(aux, want_aux, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(info, want_info, rtol=1e-5, atol=1e-6)
    assert aux["logits"].shape == (10, 1, 3)


def test_nan_and_padding_examples_change_only_counters():
  loss, params, x, y = model_case("cnn", batch=8)
  grad_fn = jax.jit(oc.clipped_grad(loss, clip=0.5, batch_argnums=(1, 2),
                                    microbatch_size=3))
  want, want_info = grad_fn(params, x[2:], y[2:])
  bad_x = x.at[0].set(jnp.nan).at[1].set(1e6)
  mask = jnp.arange(8) != 1  # Example 1 is padding; example 0 is NaN.
  got, info = grad_fn(params, bad_x, y, example_mask=mask)
  chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-8)
  assert int(info.num_nonfinite) == 1
  assert int(info.num_examples) == 6
  assert int(info.num_examples_clipped) == int(want_info.num_examples_clipped)
  np.testing.assert_allclose(info.norms[2:], want_info.norms, rtol=1e-6)


def test_max_norm_override_compiles_once_and_no_host_transfers():
  """The call-time max_norm= is traced: a sweep of thresholds runs one
  compiled function (fun is traced once), each value equal to the
  reference, without moving data to the host."""
  loss, params, x, y = model_case("mlp")
  traces = []

  def counted(p, x, y):
    traces.append(None)
    return loss(p, x, y)

  grad_fn = jax.jit(oc.clipped_grad(counted, clip=100.0,
                                    batch_argnums=(1, 2)))
  per_example = vmap_reference(loss, params, x, y)
  want_fn = jax.jit(lambda c: oc.per_example_clip(per_example, c))
  _, info = grad_fn(params, x, y)
  assert int(info.num_examples_clipped) == 0
  assert float(info.threshold) == 100.0
  counts = []
  for c in (0.05, 0.3, 1.0):
    got, info = grad_fn(params, x, y, max_norm=jnp.float32(c))
    counts.append(len(traces))
    want, want_info = want_fn(jnp.float32(c))
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)
    assert int(info.num_examples_clipped) == int(
        want_info.num_examples_clipped)
    np.testing.assert_allclose(info.threshold, c)
  assert counts[0] == counts[-1]  # No new trace, so no new compilation.
  c = jax.device_put(jnp.float32(0.3))
  with jax.transfer_guard("disallow"):
    jax.block_until_ready(grad_fn(params, x, y, max_norm=c))


@pytest.mark.slow
def test_argnums_tuple_and_kwargs():
  loss, params, x, y = model_case("mlp")

  def loss2(w, rest, x, y, *, temperature):
    return loss(w | rest, x, y) * temperature

  w = {k: params[k] for k in ("w1", "w2")}
  rest = {k: params[k] for k in ("b1", "b2")}
  (gw, grest), _ = oc.clipped_grad(loss2, argnums=(0, 1), clip=0.5,
                                   batch_argnums=(2, 3))(w, rest, x, y,
                                                         temperature=2.0)
  scaled = lambda p, x, y: 2.0 * loss(p, x, y)  # noqa: E731
  want, _ = oc.clipped_grad(scaled, clip=0.5, batch_argnums=(1, 2))(
      params, x, y)
  chex.assert_trees_all_close(gw | grest, want, rtol=1e-5, atol=1e-8)


@pytest.mark.slow
def test_bfloat16_params():
  loss, params, x, y = model_case("mlp", dtype=jnp.bfloat16)
  total, info = oc.clipped_grad(loss, clip=0.5, batch_argnums=(1, 2))(
      params, x, y)
  chex.assert_trees_all_equal_dtypes(total, params)
  assert info.norms.dtype == jnp.float32
  per_example = vmap_reference(loss, params, x, y)
  want, norms, num, _ = ref.per_example_clip(leaves64(per_example), 0.5)
  np.testing.assert_allclose(info.norms, norms, rtol=1e-6)
  assert int(info.num_examples_clipped) == num
  assert_sums_close(total, want, rtol=2e-2, atol=2e-2)


@pytest.mark.slow
@pytest.mark.parametrize("normalize", [False, True])
def test_matches_jax_privacy(normalize):
  clipping = pytest.importorskip("jax_privacy.clipping")
  loss, params, x, y = model_case("cnn")
  ours = oc.clipped_grad(loss, clip=oc.ExampleClip(0.5, normalize=normalize),
                         batch_argnums=(1, 2), microbatch_size=4)
  theirs = clipping.clipped_grad(loss, l2_clip_norm=0.5, batch_argnums=(1, 2),
                                 rescale_to_unit_norm=normalize,
                                 microbatch_size=5)
  chex.assert_trees_all_close(ours(params, x, y)[0], theirs(params, x, y),
                              rtol=1e-5, atol=1e-7)


def test_clipped_grad_errors():
  loss, params, x, y = model_case("mlp")
  with pytest.raises(ValueError, match="method='bogus'"):
    oc.clipped_grad(loss, clip=1.0, method="bogus")  # type: ignore
  with pytest.raises(ValueError, match="overlap"):
    oc.clipped_grad(loss, argnums=1, clip=1.0)
  with pytest.raises(ValueError, match="microbatch_size"):
    oc.clipped_grad(loss, clip=1.0, microbatch_size=0)
  with pytest.raises(ValueError, match="leading dimension"):
    oc.clipped_grad(loss, clip=1.0, batch_argnums=(1, 2))(params, x, y[:5])
  with pytest.raises(ValueError, match="positional"):
    oc.clipped_grad(loss, clip=1.0, batch_argnums=(1, 2, 3))(params, x, y)
  with pytest.raises(ValueError, match="clipped_grad: max_norm"):
    oc.clipped_grad(loss, clip=oc.ExampleClip(-1.0))
  with pytest.raises(TypeError, match="clip"):
    oc.clipped_grad(loss)  # type: ignore[call-arg]


def test_example_norms_exact_over_the_float32_range():
  """The power-of-two pre-scale is exact: scaling by 2**k scales the norm."""
  grads = per_example_tree(batch=5)
  leaves = jax.tree.leaves(grads)
  example_norms = jax.jit(_norms.example_norms)  # Compiled once.
  leaf_norms, norms = example_norms(leaves)
  want = np.array([ref.example_norm(leaves64(grads), i) for i in range(5)])
  np.testing.assert_allclose(norms, want, rtol=1e-6)
  for k in (-100, -60, 60, 100):  # Inputs stay normal float32 numbers.
    scaled = [x * 2.0**k for x in leaves]
    got_leaf, got = example_norms(scaled)
    np.testing.assert_array_equal(got, norms * 2.0**k)
    for a, b in zip(got_leaf, leaf_norms):
      np.testing.assert_array_equal(a, b * 2.0**k)
  # Entries up to 1e37, whose squares overflow float32 by far.
  big = [x.at[0].set(x[0] / jnp.max(jnp.abs(x[0])) * 1e37) for x in leaves]
  _, got = example_norms(big)
  want = [ref.example_norm(leaves64(big), i) for i in range(5)]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  nan = [x.at[1].set(jnp.nan).at[2, ..., 0].set(jnp.inf) for x in leaves]
  _, got = example_norms(nan)
  assert np.isnan(got[1]) and np.isinf(got[2]) and np.all(np.isfinite(got[3:]))


# ----------------------------------------------------------------------------
# Automatic clipping (Bu et al. 2022): weight C / (||g_i|| + gamma).


def linear_case(batch=7, seed=3):
  """Least squares on a linear model, with its per-example gradients
  written out in float64 NumPy: ``r_i x_i`` and ``r_i``, ``r_i`` the
  residual. Example 2 has a zero residual (a zero gradient)."""
  rng = np.random.default_rng(seed)
  w, b = rng.standard_normal(4), 0.3
  x = rng.standard_normal((batch, 4)) * np.geomspace(0.01, 10, batch)[:, None]
  y = x @ w + b + rng.standard_normal(batch)
  y[2] = x[2] @ w + b
  r = x @ w + b - y
  grads = {"b": r, "w": r[:, None] * x}  # Leaf order: b, w.

  def loss(p, x, y):
    return 0.5 * jnp.sum((x @ p["w"] + p["b"] - y) ** 2)

  params = {"b": jnp.float32(b), "w": jnp.asarray(w, jnp.float32)}
  return loss, params, jnp.asarray(x, jnp.float32), jnp.asarray(
      y, jnp.float32), [grads["b"], grads["w"]]


def closed_form(leaves, c, gamma, *, normalize=False):
  """sum_i g_i C / (||g_i|| + gamma), written out in float64."""
  n = np.sqrt(sum(np.sum(x.reshape(len(x), -1) ** 2, axis=1) for x in leaves))
  w = c / (n + gamma) / (c if normalize else 1.0)
  return [np.tensordot(w, x, axes=1) for x in leaves], n


@functools.partial(jax.jit, static_argnames=("gamma", "normalize",
                                             "per_layer", "nan_safe"))
def auto_clip(grads, c, example_mask=None, *, gamma, normalize=False,
              per_layer=False, nan_safe=True):
  """``per_example_clip`` with automatic clipping under ``jit``, the norm
  ``c`` traced (eager calls are slow to test)."""
  rule = oc.ExampleClip(c, per_layer=per_layer, normalize=normalize,
                        automatic=gamma, nan_safe=nan_safe)
  return oc.per_example_clip(grads, rule, example_mask=example_mask)


@pytest.mark.parametrize("c, gamma", [(1.0, 0.01), (0.3, 0.5), (2.5, 1e-4)])
def test_automatic_matches_the_closed_form(c, gamma):
  grads = per_example_tree(batch=8, scale=2.0)
  total, info = auto_clip(grads, jnp.float32(c), gamma=gamma)
  want, norms = closed_form(leaves64(grads), c, gamma)
  assert_sums_close(total, want, rtol=1e-5)
  assert float(info.sensitivity) == np.float32(c)
  assert int(info.num_examples_clipped) == int(np.sum(norms > c))
  ref_sums, *_ = ref.per_example_clip(leaves64(grads), c, automatic=gamma)
  assert_sums_close(total, ref_sums, rtol=1e-5)


def test_automatic_with_normalize_divides_by_the_threshold():
  grads = per_example_tree(batch=8, scale=2.0)
  total, info = auto_clip(grads, 0.7, gamma=0.01, normalize=True)
  want, _ = closed_form(leaves64(grads), 0.7, 0.01, normalize=True)
  assert_sums_close(total, want, rtol=1e-5)
  assert float(info.sensitivity) == 1.0


def test_automatic_differs_from_normalize():
  # Norms 5 and 0.5, C = 1: normalize clips the first to norm 1 and keeps
  # the second at 0.5 (divided by C = 1); automatic brings both near 1.
  grads = {"w": jnp.array([[3.0, 4.0], [0.3, 0.4]])}
  norm, _ = oc.per_example_clip(grads, oc.ExampleClip(1.0, normalize=True))
  auto, _ = auto_clip(grads, 1.0, gamma=0.01)
  np.testing.assert_allclose(norm["w"], [0.6 + 0.3, 0.8 + 0.4], rtol=1e-6)
  np.testing.assert_allclose(
      auto["w"], [3 / 5.01 + 0.3 / 0.51, 4 / 5.01 + 0.4 / 0.51], rtol=1e-6)


@pytest.mark.slow
def test_automatic_per_layer():
  grads = per_example_tree(batch=8, scale=2.0)
  total, info = auto_clip(grads, 1.5, gamma=0.01, per_layer=True)
  t = [1.5 / math.sqrt(3)] * 3
  want, _, num, _ = ref.per_example_clip(leaves64(grads), 1.5,
                                         layer_thresholds=t, automatic=0.01)
  assert_sums_close(total, want, rtol=1e-5)
  assert int(info.num_examples_clipped) == num
  np.testing.assert_allclose(info.sensitivity, 1.5, rtol=1e-6)
  tree = {"dense": 0.5, "conv": 2.0}
  total, info = oc.per_example_clip(
      grads, oc.ExampleClip(1.0, per_layer=tree, automatic=0.1))
  want, _, num, _ = ref.per_example_clip(
      leaves64(grads), 1.0, layer_thresholds=[2.0, 0.5], layers=[0, 1, 1],
      automatic=0.1)
  assert_sums_close(total, want, rtol=1e-5)
  np.testing.assert_allclose(info.sensitivity, math.sqrt(4.25), rtol=1e-6)


def test_automatic_each_example_below_the_threshold():
  grads = per_example_tree(batch=8, scale=1e3)
  c = 0.5
  got, _, _ = _property_parts(grads, jnp.float32(c), jnp.ones(8, bool), 0.01)
  got = np.asarray(got, np.float64)
  n = np.array([ref.example_norm(leaves64(grads), i) for i in range(8)])
  np.testing.assert_allclose(got, c * n / (n + 0.01), rtol=1e-5)
  assert np.all(got <= c)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), c=st.floats(1e-3, 1e3),
       log_scale=st.floats(-4, 4), gamma=st.sampled_from([0.01, 1.0]),
       drop=st.integers(0, 4))
def test_automatic_properties_bounded_norm_and_sensitivity(
    seed, c, log_scale, gamma, drop):
  grads = per_example_tree(batch=5, seed=seed, scale=10.0 ** log_scale)
  singles, total, without = _property_parts(grads, jnp.float32(c),
                                            jnp.arange(5) != drop, gamma)
  n = np.array([ref.example_norm(leaves64(grads), i) for i in range(5)])
  # Each example alone has norm c n / (n + gamma) < c ...
  np.testing.assert_allclose(singles, c * n / (n + gamma), rtol=1e-5)
  assert float(np.max(singles)) <= c * (1 + 1e-6)
  # ... and removing one moves the sum by that much, at most c.
  moved = diff_norm(total, without)
  np.testing.assert_allclose(moved, c * n[drop] / (n[drop] + gamma),
                             rtol=1e-4, atol=1e-6 * c)
  assert moved <= c * (1 + 1e-5)


def test_automatic_zero_nan_padding_and_run_time_thresholds():
  grads = per_example_tree(batch=6)
  grads = jax.tree.map(lambda x: x.at[1].set(0.0), grads)
  mask = jnp.ones(6, bool)
  total, _ = auto_clip(grads, jnp.float32(1.0), mask, gamma=0.01)
  want, _ = closed_form(leaves64(grads), 1.0, 0.01)  # Example 1 adds 0.
  assert_sums_close(total, want, rtol=1e-5)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(total))
  bad = jax.tree.map(lambda x: x.at[3].set(jnp.nan), grads)
  total, info = auto_clip(bad, jnp.float32(1.0), jnp.arange(6) != 4,
                          gamma=0.01)
  keep = [i for i in range(6) if i not in (3, 4)]
  want, _ = closed_form([x[keep] for x in leaves64(grads)], 1.0, 0.01)
  assert_sums_close(total, want, rtol=1e-5)
  assert (int(info.num_nonfinite), int(info.num_examples)) == (1, 4)
  total, _ = auto_clip(bad, 1.0, gamma=0.01, nan_safe=False)
  assert all(np.all(np.isnan(x)) for x in jax.tree.leaves(total))
  # A run-time threshold of inf, NaN or below 0 acts as 0.
  for c in (math.inf, math.nan, -1.0, 0.0):
    total, info = auto_clip(grads, jnp.float32(c), mask, gamma=0.01)
    assert all(np.all(x == 0) for x in jax.tree.leaves(total))
    assert float(info.sensitivity) == 0.0


@pytest.mark.parametrize("call, error", [
    *[(lambda bad=bad: oc.per_example_clip(
        _TREE, oc.ExampleClip(1.0, automatic=bad)), ValueError)
      for bad in (0.0, -0.01, math.nan, math.inf, 1e-40)],
    *[(lambda bad=bad: oc.per_example_clip(
        _TREE, oc.ExampleClip(1.0, automatic=bad)), TypeError)
      for bad in (True, "0.01", jnp.float32(0.01))],
])
def test_automatic_errors_name_automatic(call, error):
  with pytest.raises(error, match="automatic"):
    call()


def test_automatic_errors_name_the_threshold():
  with pytest.raises(ValueError, match="max_norm"):
    oc.per_example_clip(_TREE, oc.ExampleClip(math.inf, automatic=0.01))
  with pytest.raises(ValueError, match="max_norm"):
    oc.clipped_grad(lambda w, x: w * x,
                    clip=oc.ExampleClip(1e37, automatic=0.01))
  with pytest.raises(ValueError, match="per_layer"):
    oc.dp_aggregate(oc.ExampleClip(1.0, per_layer={"w": math.inf},
                                   automatic=0.01), 1.0, key=0)


def test_automatic_clipped_grad_vmap_and_microbatches():
  loss, params, x, y, per_example = linear_case()
  want, norms = closed_form(per_example, 1.0, 0.01)
  assert norms[2] == 0.0
  for size in (None, 3):
    grad_fn = jax.jit(oc.clipped_grad(
        loss, clip=oc.ExampleClip(1.0, automatic=0.01), batch_argnums=(1, 2),
        microbatch_size=size))
    got, info = grad_fn(params, x, y)
    assert_sums_close(got, want, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(info.norms, norms, rtol=1e-5, atol=1e-6)
    assert float(info.sensitivity) == 1.0


def test_automatic_clipped_grad_ghost_matches_the_closed_form():
  nnx = pytest.importorskip("flax.nnx")
  rng = np.random.default_rng(5)
  model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  x = rng.standard_normal((6, 4)) * np.geomspace(0.01, 10, 6)[:, None]
  y = rng.standard_normal((6, 3))
  x[1] = 0.0
  y[1] = np.asarray(model.bias[...])  # A zero gradient.

  def loss(m, x, y):
    return 0.5 * jnp.sum((m(x) - y) ** 2)

  kernel = np.asarray(model.kernel[...], np.float64)
  r = x @ kernel + np.asarray(model.bias[...], np.float64) - y
  per_example = [r, x[:, :, None] * r[:, None, :]]  # d/db, d/dW (in, out)
  want, norms = closed_form(per_example, 0.5, 0.01)  # Leaves: bias, kernel.
  args = (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
  for method in ("ghost", "vmap"):
    got, info = jax.jit(oc.clipped_grad(
        loss, clip=oc.ExampleClip(0.5, automatic=0.01), batch_argnums=(1, 2),
        method=method))(model, *args)
    assert_sums_close([got["bias"][...], got["kernel"][...]], want,
                      rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(info.norms, norms, rtol=1e-5, atol=1e-6)


def test_automatic_sharded_batch_matches_one_device():
  n = jax.device_count()
  if n < 2:
    pytest.skip("needs several devices (conftest gives 8 host devices)")
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  mesh = jax.make_mesh((n,), ("data",))
  split = NamedSharding(mesh, P("data"))
  grads = per_example_tree(batch=2 * n, scale=2.0)
  want, want_info = auto_clip(grads, 1.0, gamma=0.01)
  got, info = auto_clip(jax.device_put(grads, split), 1.0, gamma=0.01)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(info.norms, want_info.norms, rtol=1e-6)
  loss, params, x, y, per_example = linear_case(batch=n)
  grad_fn = jax.jit(oc.clipped_grad(
      loss, clip=oc.ExampleClip(1.0, automatic=0.01), batch_argnums=(1, 2)))
  got, _ = grad_fn(params, jax.device_put(x, split), jax.device_put(y, split))
  want, _ = closed_form(per_example, 1.0, 0.01)
  assert_sums_close(got, want, rtol=2e-5, atol=1e-6)


def test_automatic_huge_run_time_threshold_keeps_weights_finite():
  # max_norm / gamma beyond float32's range, known only at run time: the
  # threshold is lowered to gamma * float32max / 4, a zero example adds 0
  # (no inf * 0) and the others keep their direction.
  grads = jax.tree.map(lambda x: x.at[1].set(0.0), per_example_tree())
  total, info = auto_clip(grads, jnp.float32(3e38), gamma=0.01)
  top = np.float32(0.01 * float(np.finfo(np.float32).max) / 4)
  assert float(info.sensitivity) == float(top)
  want, _ = closed_form(leaves64(grads), float(top), 0.01)
  assert_sums_close(total, want, rtol=1e-5, atol=0)
