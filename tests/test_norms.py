"""optaxclip.global_norm and the per-leaf norms against float64 NumPy."""

import functools
import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optaxclip as oc
from optaxclip import _norms, _numerics
from tests import _helpers as helpers

ORDS = [1, 2, math.inf, 3, 0.5, "rms"]


def tree_of(rng, dtype=np.float32, scale=1.0):
  return {
      "dense": {"kernel": (rng.standard_normal((7, 5)) * scale).astype(dtype),
                "bias": (rng.standard_normal(5) * scale).astype(dtype)},
      "scalar": np.asarray(rng.standard_normal() * scale, dtype),
      "conv": (rng.standard_normal((3, 3, 2, 4)) * scale).astype(dtype),
  }


# ----------------------------------------------------------------------------
# global_norm.


@pytest.mark.parametrize("ord", ORDS)
def test_global_norm_matches_float64_numpy(ord):
  tree = tree_of(np.random.default_rng(0))
  got = oc.global_norm(jax.tree.map(jnp.asarray, tree), ord=ord)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, helpers.np_norm(tree, ord), rtol=2e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_accumulates_in_float32(dtype):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal(4096) * 100, dtype)
  got = oc.global_norm(x)
  want = helpers.np_norm(np.asarray(x.astype(jnp.float32)))
  assert got.dtype == jnp.float32
  # Each input is exact in float32, so only float32 summation error remains;
  # accumulating in bfloat16 would be off by ~1e-2 relative.
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert np.isfinite(got)


def test_float16_squares_that_overflow_float16():
  x = jnp.full((10,), 300.0, jnp.float16)
  np.testing.assert_allclose(oc.global_norm(x), 300 * np.sqrt(10), rtol=1e-6)
  # The plain optax norm overflows here.
  assert not np.isfinite(optax.global_norm(x))


@pytest.mark.parametrize("ord", [1, 2, 3, 8, "rms"])
def test_huge_float32_values_do_not_overflow(ord):
  x = jnp.asarray([1e38, -3e37, 2e37, 5.0], jnp.float32)
  got = oc.global_norm({"a": x}, ord=ord)
  assert np.isfinite(got)
  np.testing.assert_allclose(got, helpers.np_norm(np.asarray(x), ord),
                             rtol=1e-5)


@pytest.mark.parametrize("ord", [1, 2, 3, 0.5])
def test_tiny_float32_values_do_not_underflow(ord):
  x = jnp.asarray([1e-25, -3e-26, 2e-30], jnp.float32)
  got = oc.global_norm(x, ord=ord)
  np.testing.assert_allclose(got, helpers.np_norm(np.asarray(x), ord),
                             rtol=1e-5)


def test_zero_tree():
  assert float(oc.global_norm({"a": jnp.zeros(3)})) == 0.0
  assert float(oc.global_norm({})) == 0.0


def test_nonfinite_inputs():
  assert float(oc.global_norm(jnp.array([1.0, jnp.inf]))) == math.inf
  assert np.isnan(oc.global_norm(jnp.array([1.0, jnp.nan])))
  assert np.isnan(oc.global_norm(jnp.array([1e38, jnp.nan])))


def test_complex_uses_modulus():
  x = jnp.asarray([3 + 4j, 1j], jnp.complex64)
  np.testing.assert_allclose(oc.global_norm(x), np.sqrt(26), rtol=1e-6)
  np.testing.assert_allclose(oc.global_norm(x, ord=1), 6.0, rtol=1e-6)
  np.testing.assert_allclose(oc.global_norm(x, ord=3), (125 + 1) ** (1 / 3),
                             rtol=1e-6)
  np.testing.assert_allclose(oc.global_norm(x, ord=3),
                             helpers.np_norm(np.asarray(x), 3), rtol=1e-6)


def test_none_and_masked_leaves_are_ignored():
  tree = {"a": jnp.array([3.0, 4.0]), "b": None, "c": optax.MaskedNode()}
  np.testing.assert_allclose(oc.global_norm(tree), 5.0, rtol=1e-6)


def test_float64():
  with jax.enable_x64(True):
    x = jnp.asarray([1e200, 1e200], jnp.float64)
    got = oc.global_norm(x)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, np.sqrt(2) * 1e200, rtol=1e-12)
    mixed = {"a": jnp.ones(3, jnp.float32), "b": jnp.ones(1, jnp.float64)}
    assert oc.global_norm(mixed).dtype == jnp.float64


@pytest.mark.parametrize(**helpers.JIT)
def test_global_norm_jit_and_eager(jitted):
  norm = helpers.maybe_jit(oc.global_norm, jitted)
  tree = {"a": jnp.asarray([1e38, 1e38]), "b": jnp.asarray([1.0])}
  np.testing.assert_allclose(norm(tree), np.sqrt(2) * 1e38, rtol=1e-6)


def test_under_jit_and_vmap():
  x = jnp.arange(12.0).reshape(3, 4)
  np.testing.assert_allclose(jax.jit(oc.global_norm)(x), np.linalg.norm(x),
                             rtol=1e-6)
  np.testing.assert_allclose(jax.vmap(oc.global_norm)(x),
                             np.linalg.norm(x, axis=1), rtol=1e-6)


def test_traced_ord():
  x = jnp.asarray([3.0, -4.0, 1e38])
  f = jax.jit(oc.global_norm)  # One program: ord is a traced argument.
  for ord in (1.0, 2.0, math.inf, 3.0):
    np.testing.assert_allclose(f(x, ord=jnp.asarray(ord)),
                               helpers.np_norm(np.asarray(x), ord), rtol=1e-5)


@pytest.mark.parametrize("ord", [0, -1, math.nan, "fro", True, None])
def test_bad_ord(ord):
  with pytest.raises((ValueError, TypeError), match="ord"):
    oc.global_norm(jnp.ones(2), ord=ord)


def test_integer_leaf_is_named():
  with pytest.raises(TypeError, match=r"\['ids'\].*int32"):
    oc.global_norm({"w": jnp.ones(2), "ids": jnp.ones(2, jnp.int32)})


# One program per shape and ord (fewer compiles than eager op-by-op).
_jitted_global_norm = jax.jit(oc.global_norm, static_argnames="ord")


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3,
                                                max_side=6),
                  elements=st.floats(width=32, allow_nan=False,
                                     allow_infinity=False,
                                     allow_subnormal=False)),
       st.sampled_from([1, 2, 3, math.inf]))
@pytest.mark.slow
def test_global_norm_property_any_finite_input(x, ord):
  got = float(_jitted_global_norm(jnp.asarray(x), ord=ord))
  want = helpers.np_norm(x, ord)
  top = float(np.finfo(np.float32).max)
  if want > top * (1 + 1e-6):
    assert got == math.inf
  elif want > top * (1 - 1e-6):  # Within rounding of the largest float32.
    assert got == math.inf or np.isclose(got, want, rtol=1e-5)
  else:
    assert np.isfinite(got)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-37)


# ----------------------------------------------------------------------------
# Per-leaf norms.


@pytest.mark.parametrize("axis", [None, 0, -1, (0, 1)])
@pytest.mark.parametrize("ord", ORDS)
def test_leaf_norms_match_numpy(ord, axis):
  rng = np.random.default_rng(2)
  tree = {"k": rng.standard_normal((6, 4)).astype(np.float32),
          "c": rng.standard_normal((3, 2, 5)).astype(np.float32)}
  got = _norms.leaf_norms(jax.tree.map(jnp.asarray, tree), ord, axis=axis)
  for name, x in tree.items():
    axes = tuple(range(x.ndim)) if axis is None else (
        (axis,) if isinstance(axis, int) else axis)
    moved = np.moveaxis(x, axes, tuple(range(-len(axes), 0)))
    flat = moved.reshape(moved.shape[:-len(axes)] + (-1,))
    want = np.apply_along_axis(lambda v: helpers.np_norm(v, ord), -1,
                               flat.astype(np.float64))
    np.testing.assert_allclose(np.squeeze(got[name], axes), want, rtol=2e-6)
    assert got[name].ndim == x.ndim  # Reduced axes kept.


def test_leaf_norms_overflow_in_one_leaf_only():
  tree = {"big": jnp.asarray([2e38, 2e38]), "small": jnp.asarray([3.0, 4.0]),
          "over": jnp.asarray([3e38, 3e38])}
  got = _norms.leaf_norms(tree)
  np.testing.assert_allclose(got["big"], 2e38 * np.sqrt(2), rtol=1e-6)
  assert float(got["over"][0]) == math.inf  # Not representable.
  np.testing.assert_allclose(got["small"], 5.0, rtol=1e-6)


def test_leaf_norms_axis_that_a_leaf_lacks():
  with pytest.raises(ValueError, match=r"axis=2.*\['b'\]"):
    _norms.leaf_norms({"a": jnp.ones((2, 2, 2)), "b": jnp.ones(3)}, axis=2)


# ----------------------------------------------------------------------------
# The cold path stacks leaves of one type: many same-shape leaves of very
# different magnitudes, in several chunks, must each keep their own norm.


_ORDS_COLD = (2, 1, 3)


@functools.cache
def _compiled_parts(chunk):
  """The global and per-leaf norm parts for every ord in ``_ORDS_COLD``, one
  jitted program per chunk size.

  A fresh function per chunk size: the chunking is decided when tracing, so
  a program traced under one ``_CHUNK_BYTES`` must not serve another. The
  magnitudes share the program (same shapes, other values).
  """
  del chunk  # A key of the cache only.

  @jax.jit
  def parts(tree):
    leaves = jax.tree.leaves(tree)
    axes = tuple(tuple(range(x.ndim)) for x in leaves)
    return {ord: (_norms.global_norm_parts(tree, ord),
                  _norms.leaf_norm_parts(leaves, ord, axes))
            for ord in _ORDS_COLD}

  return parts


@pytest.mark.parametrize("chunk", [None, 3 * 4 * 5 * 4])  # 3 leaves a chunk.
@pytest.mark.parametrize("magnitude", [3e37, 1e-18, 1e-25])
@pytest.mark.slow
def test_same_shape_leaves_on_the_cold_path(monkeypatch, chunk, magnitude):
  if chunk is not None:
    monkeypatch.setattr(_norms, "_CHUNK_BYTES", chunk)
  rng = np.random.default_rng(11)
  tree = {f"l{i:02d}": (rng.standard_normal((4, 5)) * magnitude
                        * (i % 7 + 1) ** 3).astype(np.float32)
          for i in range(13)}
  tree["other"] = (rng.standard_normal(6) * magnitude).astype(np.float32)
  leaves = jax.tree.leaves(tree)
  jleaves = [jnp.asarray(x) for x in leaves]

  def value(parts):
    return (np.float64(parts.power).squeeze()
            * np.float64(parts.scaled).squeeze())

  every = _compiled_parts(chunk)(jax.tree.map(jnp.asarray, tree))
  for ord in _ORDS_COLD:
    parts, per_leaf = every[ord]
    np.testing.assert_allclose(value(parts), helpers.np_norm(leaves, ord),
                               rtol=1e-5)
    for x, n in zip(leaves, per_leaf):
      want = helpers.np_norm(x, ord)
      if np.all(np.abs(np.float64(x)) ** ord < np.finfo(np.float32).tiny):
        # Every power underflows: per-leaf norms take the zero sum at its
        # word (documented), which clips as the true norm would.
        assert value(n) == 0.0
      else:
        np.testing.assert_allclose(value(n), want, rtol=1e-5)
  units = _norms.leaf_norm_parts(jleaves, 2, [(0,)] * len(leaves))
  for x, n in zip(leaves, units):
    if magnitude == 1e-25:
      continue
    want = np.sqrt(np.sum(np.asarray(x, np.float64) ** 2, axis=0,
                          keepdims=True))
    np.testing.assert_allclose(np.float64(n.power) * np.float64(n.scaled), want,
                               rtol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_power_of_two_helpers_are_exact(dtype):
  info = np.finfo(dtype)
  with jax.enable_x64(dtype == np.float64):
    e = jnp.arange(info.minexp, info.maxexp, dtype=jnp.int32)
    got = np.asarray(_numerics.pow2(e, dtype))
    np.testing.assert_array_equal(got, np.ldexp(dtype(1), np.asarray(e)))
    m = jnp.asarray([0.0, 0.3, 1.0, 3.0, 1e30, float(info.max)], dtype)
    ex = np.asarray(_numerics.exponent(m))
    assert np.all(np.ldexp(dtype(1), ex)[1:-1] > np.asarray(m)[1:-1])
    assert ex.max() <= info.maxexp - 2 and ex.min() >= info.minexp + 1


# ----------------------------------------------------------------------------
# NormParts: exact, mergeable partial norms.


def _fixed_point_reference(leaves, p: float) -> tuple[int, float]:
  """The sum of ``floor(t * 2**56)`` over every element, as a Python int,
  ``t = float32(|x * 2**-e|) ** p`` with ``2**e`` just above the largest
  ``|x|``; and the float64 norm it stands for."""
  x = np.concatenate([np.ravel(np.abs(np.asarray(v, np.float32)))
                      for v in leaves])
  m = float(np.max(x))
  e = math.frexp(m)[1]  # m * 2**-e in [0.5, 1)
  y = (x * np.float32(2.0 ** -e)).astype(np.float32)
  t = y * y if p == 2 else (y if p == 1 else y.astype(np.float64) ** p)
  total = sum(math.floor(float(v) * 2 ** 56) for v in t.astype(np.float64))
  return total, 2.0 ** e * (total / 2 ** 56) ** (1 / p)


def _limbs_value(parts) -> int:
  return sum(int(v) << (8 * j) for j, v in enumerate(np.asarray(parts.limbs)))


@pytest.mark.parametrize("p", [2, pytest.param(1, marks=pytest.mark.slow)])
def test_norm_parts_limbs_are_the_exact_fixed_point_sum(p):
  rng = np.random.default_rng(3)
  tree = {"a": rng.normal(size=(40, 9)).astype(np.float32) * 1e3,
          "b": rng.normal(size=(5,)).astype(np.float32) * 1e-4,
          "c": np.float32(2.5)}
  parts = jax.jit(functools.partial(oc.norm_parts, ord=p))(tree)
  want, norm = _fixed_point_reference(jax.tree.leaves(tree), p)
  assert _limbs_value(parts) == want
  assert parts.size == 366 and parts.ord == float(p)
  np.testing.assert_allclose(float(parts.norm()), norm, rtol=1e-6)
  np.testing.assert_allclose(float(parts.norm()), helpers.np_norm(tree, p),
                             rtol=1e-6)


_FLOATS = hnp.arrays(np.float32, (6,), elements=st.floats(
    -2.0 ** 100, 2.0 ** 100, width=32, allow_subnormal=False))


@jax.jit
def _merges_on_one_peak(a, b, c):
  peak = jnp.max(jnp.abs(jnp.stack([a, b, c])))
  pa, pb, pc = (oc.norm_parts(v, peak=peak) for v in (a, b, c))
  whole = oc.norm_parts({"a": a, "b": b, "c": c})
  return whole, ((pa + pb) + pc, pa + (pb + pc), pc + (pb + pa),
                 (pb + pc).merge(pa))


@jax.jit
def _merges_on_own_peaks(a, b):
  pa, pb = oc.norm_parts(a), oc.norm_parts(b)
  return pa + pb, pb + pa


@pytest.mark.slow
@settings(max_examples=25, deadline=None)
@given(_FLOATS, _FLOATS, _FLOATS)
def test_merging_parts_on_one_peak_is_exact(a, b, c):
  # Parts made on a common peak merge as integers: associative and
  # commutative bit for bit, and equal to the parts of everything at once.
  whole, merges = _merges_on_one_peak(a, b, c)
  for merged in merges:
    np.testing.assert_array_equal(merged.limbs, whole.limbs)
    np.testing.assert_array_equal(merged.peak, whole.peak)
    assert merged.size == 18
    np.testing.assert_array_equal(merged.norm(), whole.norm())


@pytest.mark.slow
@settings(max_examples=25, deadline=None)
@given(_FLOATS, _FLOATS)
def test_merging_parts_on_different_peaks(a, b):
  # Each part on its own peak: commutative bit for bit, and the merged norm
  # that of the exact sum (the smaller part rounded down onto the larger's
  # grid).
  ab, ba = _merges_on_own_peaks(a, b)
  np.testing.assert_array_equal(ab.limbs, ba.limbs)
  exact = helpers.np_norm({"a": a, "b": b})
  np.testing.assert_allclose(float(ab.norm()), exact, rtol=1e-6)
  ref, _ = _fixed_point_reference([a, b], 2)
  # Rounding the smaller part's sum down, rather than each of its terms,
  # keeps at most one unit per term more than the terms on the top grid.
  assert 0 <= _limbs_value(ab) - ref <= 6


@pytest.mark.slow
def test_norm_parts_mask_and_every_ord():
  rng = np.random.default_rng(4)
  tree = {"w": rng.normal(size=(8, 3)).astype(np.float32),
          "tied": rng.normal(size=(4, 3)).astype(np.float32),
          "h": rng.normal(size=(5,)).astype(np.float16)}
  ords = (3, 2.5, "rms", math.inf)  # 1 and 2: the tests above

  @jax.jit
  def run(tree):
    out = []
    for ord in ords:
      whole = oc.norm_parts(tree, ord=ord)
      first = oc.norm_parts(tree, ord=ord, mask={"w": True, "tied": True,
                                                  "h": False})
      second = oc.norm_parts(tree, ord=ord,
                             mask=lambda t: {k: k == "h" for k in t})
      assert (first + second).size == whole.size == 41
      out.append(((first + second).norm(), whole.norm()))
    # A tied weight counted by one stage only: the norm of the tree once.
    stage1 = oc.norm_parts({"w": tree["w"], "tied": tree["tied"]})
    stage2 = oc.norm_parts({"h": tree["h"], "tied": tree["tied"]},
                           mask={"h": True, "tied": False})
    return out, (stage1 + stage2).norm()

  out, tied = run(tree)
  for ord, (merged, whole) in zip(ords, out):
    np.testing.assert_allclose(float(merged), helpers.np_norm(tree, ord),
                               rtol=2e-6)
    np.testing.assert_allclose(float(whole), helpers.np_norm(tree, ord),
                               rtol=2e-6)
  np.testing.assert_allclose(float(tied), helpers.np_norm(tree), rtol=1e-6)


@pytest.mark.slow
def test_norm_parts_edge_cases():
  big = np.full((3,), 3e38, np.float32)  # Its squares overflow float32.
  parts = oc.norm_parts(big)
  n = _norms.parts_norm(parts)
  assert np.isinf(parts.norm())
  np.testing.assert_allclose(float(n.power) * float(n.scaled),
                             math.sqrt(3) * 3e38, rtol=1e-6)
  tiny = np.full((4,), 1e-30, np.float32)  # Their squares underflow.
  np.testing.assert_allclose(float(oc.norm_parts(tiny).norm()), 2e-30,
                             rtol=1e-6)
  assert float(oc.norm_parts({"z": np.zeros(3, np.float32)}).norm()) == 0
  assert float(oc.norm_parts({}).norm()) == 0
  assert np.isnan(oc.norm_parts(np.array([1.0, np.nan], np.float32)).norm())
  assert np.isinf(oc.norm_parts(np.array([1.0, -np.inf], np.float32)).norm())
  stacked = jax.tree.map(lambda *v: jnp.stack(v), oc.norm_parts(big[:2]),
                         oc.norm_parts(tiny[:2]))  # as process_allgather
  np.testing.assert_array_equal(stacked.merge_stacked().limbs,
                                (oc.norm_parts(big[:2])
                                 + oc.norm_parts(tiny[:2])).limbs)
  with pytest.raises(ValueError, match="ord"):
    oc.norm_parts(big) + oc.norm_parts(big, ord=1)
  with pytest.raises(TypeError, match="NormParts"):
    oc.norm_parts(big).merge(1.0)
  with pytest.raises(TypeError, match="traced"):
    jax.jit(lambda o: oc.norm_parts(big, ord=o))(2.0)
