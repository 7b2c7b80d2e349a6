"""Every transform on sharded gradients: same result as on one device.

Three settings, on the 8 host CPU devices that conftest.py asks for:
- plain ``jax.jit`` with gradients carrying a ``NamedSharding`` (replicated,
  data-parallel, FSDP-style, a 2-D mesh): no argument needed; the compiled
  program must keep the gradients' shardings and only all-reduce norms;
- ``shard_map`` and ``pmap``, where each device holds its shard:
  ``axis_name=`` makes the global norm (and every state built on it) that of
  the whole update, identical on every device;
- the data-parallel pattern, one full gradient per device: clipping after
  ``pmean`` clips the batch gradient, clipping before it clips each device's.
"""

import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import optaxclip as oc

pytestmark = pytest.mark.slow

SHAPES = {
    "w1": (16, 32), "b1": (32,), "conv": (3, 3, 8, 16), "emb": (24, 16),
    "gain": (),
}
DTYPES = {"emb": jnp.bfloat16}
# Per step: a plain gradient, a smaller one, then a spike.
STEP_SCALES = (1.0, 0.5, 20.0)
STEPS = len(STEP_SCALES)


def gradients(scale: float = 1.0, seed: int = 0) -> dict[str, np.ndarray]:
  """The gradients of every step, stacked along a leading axis."""
  rng = np.random.default_rng(seed)
  out = {}
  for k, shape in SHAPES.items():
    steps = np.reshape(STEP_SCALES, (-1,) + (1,) * len(shape))
    out[k] = (rng.normal(size=shape) * scale / 8 * steps).astype(
        DTYPES.get(k, np.float32))
  return out


def parameters() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(1)
  return {k: rng.normal(size=s).astype(DTYPES.get(k, np.float32))
          for k, s in SHAPES.items()}


def _no_scalars(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """``tx`` on every leaf but the scalar one (which has no axis to reduce)."""
  return optax.masked(tx, {k: bool(s) for k, s in SHAPES.items()})


# The spike rules: they act on the third step's spike (STEP_SCALES).
ZSCORE = oc.ZScore(warmup_steps=2, num_std=1.0)
SPIKE_EMA = oc.SpikeEMA(max_ratio=4.0, warmup_steps=2)

# The transforms, by name: (constructor, how big a collective may be).
# "scalar": norms of whole trees or leaves only; "units": one norm per unit.
TRANSFORMS: dict[str, tuple[Callable[[], Any], str]] = {
    "check_finite": (oc.check_finite, "scalar"),
    "clip_by_value": (lambda: oc.clip_by_value(0.05, full_stats=True), "scalar"),
    "clip_by_norm": (lambda: oc.clip_by_norm(0.5), "scalar"),
    "clip_by_norm_axis0": (
        lambda: _no_scalars(oc.clip_by_norm(0.3, axis=0)), "units"),
    "clip_by_norm_rms_last": (
        lambda: _no_scalars(oc.clip_by_norm(0.05, ord="rms", axis=-1)), "units"),
    "clip_by_global_norm": (lambda: oc.clip_by_global_norm(1.0), "scalar"),
    "clip_by_global_norm_ord1": (
        lambda: oc.clip_by_global_norm(10.0, ord=1), "scalar"),
    "clip_by_global_norm_inf": (
        lambda: oc.clip_by_global_norm(0.2, ord=math.inf), "scalar"),
    "clip_by_global_norm_rms": (
        lambda: oc.clip_by_global_norm(0.05, ord="rms"), "scalar"),
    "clip_by_global_norm_ord3": (
        lambda: oc.clip_by_global_norm(0.5, ord=3), "scalar"),
    "adaptive_grad_clip": (lambda: oc.adaptive_grad_clip(0.02), "units"),
    "clip_by_quantile": (lambda: oc.clip_by_quantile(0.5, window=4), "scalar"),
    "clip_by_quantile_per_leaf": (
        lambda: oc.clip_by_quantile(0.5, window=4, per_leaf=True), "scalar"),
    "zclip": (lambda: oc.zclip(ZSCORE), "scalar"),
    "adagc": (lambda: oc.adagc(warmup_steps=1, max_norm=2.0), "scalar"),
    "clip_spikes": (lambda: oc.clip_spikes(20.0, decay=0.9), "scalar"),
    "spike_clipped": (
        lambda: oc.spike_clipped(optax.adam(1e-2), max_ratio=20.0), "scalar"),
    "skip_step": (
        lambda: oc.skip_step(oc.clip_by_global_norm(1.0), skip_norm=20.0,
                             rule=SPIKE_EMA), "scalar"),
    "clip_update_rms": (
        lambda: oc.clip_update_rms(optax.adam(1e-2, b2=0.9), leaf_norms=True),
        "scalar"),
    "clip_update_by_history": (
        lambda: oc.clip_update_by_history(window=2, num_std=0.5), "scalar"),
}


def test_every_public_transform_is_covered():
  # Per-example clipping and DP take per-example gradients: tests/test_dp.py
  # and tests/test_per_example.py run them on meshes; qk_clip reads per-head
  # logits, tests/test_qk_clip.py runs it on a mesh. clip_by_spectral_norm
  # has its sharded-jit test in tests/test_spectral.py; dynamic_loss_scale
  # runs its inner optimizer through skip_step (covered here) and both are
  # in tests/test_devices.py's 8-device battery; adopt_state and loss_scale
  # read states.
  per_example = ("clipped_grad", "per_example_clip", "quantile_norm",
                 "dp_aggregate", "dp_noise", "qk_clip", "max_logit_attention",
                 "gather_max_logits", "clip_by_spectral_norm",
                 "dynamic_loss_scale", "adopt_state", "loss_scale")
  public = {name for name in oc.__all__ if name[0].islower()
            and name not in ("clip_stats", "global_norm", "raise_if_nonfinite",
                              "layer_axes", "norm_parts",
                              *per_example)}
  covered = {name for name in public
             if any(key == name or key.startswith(name + "_")
                    for key in TRANSFORMS)}
  assert public == covered, f"add to TRANSFORMS: {sorted(public - covered)}"


# ----------------------------------------------------------------------------
# Meshes and shardings.


def make_mesh(kind: str, axis_type: AxisType = AxisType.Auto) -> Mesh:
  if kind == "2d":
    return jax.make_mesh((2, 4), ("data", "model"),
                         axis_types=(axis_type, axis_type))
  return jax.make_mesh((8,), ("data",), axis_types=(axis_type,))


def spec(kind: str, shape: tuple[int, ...]) -> P:
  """The sharding of one leaf in each layout."""
  if kind == "replicated" or not shape:
    return P()
  if kind == "data":  # Split along the leading axis, as a batch is.
    return P("data") if shape[0] % 8 == 0 else P()
  if kind == "fsdp":  # Along the largest axis, as FSDP shards parameters.
    for a in sorted(range(len(shape)), key=lambda a: -shape[a]):
      if shape[a] % 8 == 0:
        return P(*["data" if i == a else None for i in range(len(shape))])
    return P()
  assert kind == "2d"  # Last axis over "model", the one before over "data".
  if len(shape) == 1:  # A bias: split over "model", replicated over "data".
    return P("model")
  return P(*[None] * (len(shape) - 2), "data", "model")


def put(tree: Any, mesh: Mesh, kind: str, stacked: bool = False) -> Any:
  """``tree`` sharded as ``kind`` says (after the leading step axis if any)."""
  return {k: jax.device_put(v, NamedSharding(mesh, specs(kind, v, stacked)))
          for k, v in tree.items()}


def specs(kind: str, x: Any, stacked: bool = False) -> P:
  if stacked:
    return P(None, *spec(kind, np.shape(x)[1:]))
  return spec(kind, np.shape(x))


def tree_specs(kind: str, tree: Any, stacked: bool = False) -> Any:
  return {k: specs(kind, v, stacked) for k, v in tree.items()}


def one_device(tree: Any) -> Any:
  return jax.device_put(tree, jax.devices()[0])


# ----------------------------------------------------------------------------
# Running and comparing.


def run_steps(tx: optax.GradientTransformation, grads: Any, params: Any):
  """One update per step from a fresh state; ``grads`` are stacked by step."""
  def step(state, g):
    u, state = tx.update(g, state, params)
    return state, u

  state, outs = jax.lax.scan(step, tx.init(params), grads)
  return outs, state


def assert_close(actual: Any, expected: Any, what: str) -> None:
  paths_a = jax.tree_util.tree_leaves_with_path(actual)
  leaves_e = jax.tree_util.tree_leaves(expected)
  assert len(paths_a) == len(leaves_e), what
  for (path, a), e in zip(paths_a, leaves_e):
    name = f"{what}{jax.tree_util.keystr(path)}"
    a, e = np.asarray(a), np.asarray(e)
    assert a.dtype == e.dtype and a.shape == e.shape, name
    if a.dtype == bool or np.issubdtype(a.dtype, np.integer):
      np.testing.assert_array_equal(a, e, err_msg=name)
    else:
      rtol = 1e-2 if a.dtype == jnp.bfloat16 else 2e-5
      np.testing.assert_allclose(a.astype(np.float64), e.astype(np.float64),
                                 rtol=rtol, atol=1e-6, err_msg=name)


def run_suite(names: list[str], grads: Any, params: Any,
              make: Callable[[str], optax.GradientTransformation] | None = None
              ) -> dict[str, Any]:
  """Every named transform's ``run_steps``, in one program."""
  make = make or (lambda name: TRANSFORMS[name][0]())
  return {name: run_steps(make(name), grads, params) for name in names}


_REFERENCE: dict[float, Any] = {}


def reference(names: list[str], scale: float = 1.0) -> dict[str, Any]:
  """The single-device results (all transforms computed once, in one program)."""
  if scale not in _REFERENCE:
    everything = list(TRANSFORMS) if scale == 1.0 else OVERFLOW_NAMES
    _REFERENCE[scale] = jax.jit(lambda g, p: run_suite(everything, g, p))(
        one_device(gradients(scale)), one_device(parameters()))
  return {name: _REFERENCE[scale][name] for name in names}


def assert_suite_close(results: dict[str, Any], expected: dict[str, Any]) -> None:
  assert results.keys() == expected.keys()
  for name, (outs, state) in results.items():
    assert_close(outs, expected[name][0], f"{name} updates")
    assert_close(state, expected[name][1], f"{name} state")


# ----------------------------------------------------------------------------
# Reading compiled HLO.

_COLLECTIVE = re.compile(
    r"=\s*(?P<shape>.*?)\s(?P<op>all-reduce|all-gather|all-to-all|"
    r"ragged-all-to-all|reduce-scatter|collective-permute|collective-broadcast)"
    r"(?:-start)?\(.*?replica_groups=(?P<groups>mesh\[[^\]]*\]\s*\{[^}]*\}|"
    r"\{[^ ]*?\}|\[[\d,]*\]<=\[[\d,]*\](?:T\([\d,]*\))?)")


def collectives(hlo: str, entry_only: bool = False) -> list[dict[str, Any]]:
  """Each collective op of a compiled module: op, operand sizes, groups."""
  found = []
  for comp in re.split(r"\n(?=\S)", hlo):
    if entry_only and not comp.startswith("ENTRY"):
      continue
    for line in comp.splitlines():
      m = _COLLECTIVE.search(line)
      if m:
        sizes = [math.prod(int(d) for d in dims.split(",") if d) for dims in
                 re.findall(r"\w+\[([\d,]*)\]", m["shape"])]
        found.append({"op": m["op"], "sizes": sizes, "groups": m["groups"]})
  return found


def compiled_text(fn: Callable, *args) -> str:
  return jax.jit(fn).lower(*args).compile().as_text()


# ----------------------------------------------------------------------------
# Plain jit on sharded arrays.

LAYOUTS = ["replicated", "data", "fsdp", "2d"]
GROUPS = {
    group: [name for name, (_, kind) in TRANSFORMS.items() if kind == group]
    for group in ("scalar", "units")
}
# Same code path as ord=2 but for the power: checked on the 2-D mesh only.
ORD_VARIANTS = ("clip_by_global_norm_ord1", "clip_by_global_norm_ord3")


@pytest.mark.parametrize(("layout", "group"), [
    (layout, group) for layout in LAYOUTS for group in GROUPS
    if (layout, group) != ("replicated", "units")])
def test_jit_on_sharded_gradients_matches_one_device(layout, group):
  names = [n for n in GROUPS[group] if layout == "2d" or n not in ORD_VARIANTS]
  mesh = make_mesh(layout)
  grads = put(gradients(), mesh, layout, stacked=True)
  params = put(parameters(), mesh, layout)
  compiled = jax.jit(lambda g, p: run_suite(names, g, p)).lower(
      grads, params).compile()
  results = compiled(grads, params)

  assert_suite_close(results, reference(names))
  for name, (outs, _) in results.items():
    for k, g in grads.items():
      assert outs[k].sharding.is_equivalent_to(g.sharding, g.ndim), (
          f"{name}: leaf {k} came out as {outs[k].sharding}, went in as"
          f" {g.sharding}")

  found = collectives(compiled.as_text())
  if layout == "replicated":
    assert found == []
    return
  moved = [c["op"] for c in found if c["op"] != "all-reduce"]
  assert not moved, f"gradients moved between devices: {moved}"
  if group == "scalar":
    bound = 1
  else:  # The most units of any leaf under any of the unit rules run here.
    bound = max(_units(s, axes) for s in SHAPES.values() if s
                for axes in ((0,), (len(s) - 1,), _agc_axes(s)))
  sizes = [s for c in found for s in c["sizes"]]
  assert sizes and max(sizes) <= bound, (sizes, bound)


def _units(shape: tuple[int, ...], axes: tuple[int, ...]) -> int:
  return int(np.prod([d for i, d in enumerate(shape) if i not in axes]))


def _agc_axes(shape: tuple[int, ...]) -> tuple[int, ...]:
  """adaptive_grad_clip's default unit axes (optax's per-shape rule)."""
  if sum(d != 1 for d in shape) <= 1:
    return tuple(range(len(shape)))
  return (0,) if len(shape) in (2, 3) else tuple(range(len(shape) - 1))


def test_explicit_axis_types_match_one_device():
  # jax.make_mesh's default axis type is Explicit: shardings are then part
  # of the array types at trace time.
  mesh = make_mesh("2d", AxisType.Explicit)
  names = ["clip_by_global_norm", "clip_by_norm_axis0"]
  grads = put(gradients(), mesh, "2d", stacked=True)
  params = put(parameters(), mesh, "2d")
  results = jax.jit(lambda g, p: run_suite(names, g, p))(grads, params)
  assert_suite_close(results, reference(names))
  for outs, _ in results.values():
    for k, g in grads.items():
      assert outs[k].sharding.is_equivalent_to(g.sharding, g.ndim)


@pytest.mark.parametrize("layout", ["data", "fsdp", "2d"])
def test_global_norm_under_jit_all_reduces_only_scalars(layout):
  # The partitioner all-reduces each leaf's partial sum; XLA's all-reduce
  # combiner merges those over the same devices into one op. So the norm
  # costs one collective per distinct group of devices the leaves are split
  # over: on the 2-D mesh, one over "model" (every split leaf), then one over
  # "data" (the leaves split over both axes).
  mesh = make_mesh(layout)
  grads = put(jax.tree.map(lambda x: x[0], gradients()), mesh, layout)
  tx = oc.clip_by_global_norm(1.0)
  hlo = compiled_text(tx.update, grads, tx.init(grads))
  main = collectives(hlo, entry_only=True)
  assert {c["op"] for c in main} == {"all-reduce"}
  assert all(s == 1 for c in main for s in c["sizes"]), main
  groups = [c["groups"] for c in main]
  assert len(groups) == len(set(groups)), f"uncombined all-reduces: {main}"
  assert len(main) == (2 if layout == "2d" else 1), main
  # Only the rare rescaled branch (overflow, or an all-zero tree) adds more.
  rest = collectives(hlo)
  assert all(s == 1 for c in rest for s in c["sizes"]), rest
  # global_norm alone: the same.
  alone = collectives(compiled_text(oc.global_norm, grads), entry_only=True)
  assert sorted(c["groups"] for c in alone) == sorted(groups)


def test_reproducible_norm_under_jit_all_reduces_only_small_vectors():
  # The exact accumulation: a max, then each leaf's limb sums (7 numbers,
  # or 12 after carrying), all-reduced; no gradient moves between devices.
  mesh = make_mesh("2d")
  grads = put(jax.tree.map(lambda x: x[0], gradients()), mesh, "2d")
  tx = oc.clip_by_global_norm(1.0, reproducible=True)
  found = collectives(compiled_text(tx.update, grads, tx.init(grads)))
  assert found and {c["op"] for c in found} == {"all-reduce"}, found
  assert max(s for c in found for s in c["sizes"]) <= 12, found


def test_global_norm_on_sharded_overflowing_gradients():
  # Values near float32's top: the overflow-safe branch runs across devices.
  mesh = make_mesh("2d")
  grads = jax.tree.map(lambda x: x[0], gradients(scale=1e37))
  ords = [2, 1, math.inf, "rms", 3]
  expected = [oc.global_norm(one_device(grads), ord=ord) for ord in ords]
  got = jax.jit(lambda g: [oc.global_norm(g, ord=ord) for ord in ords])(
      put(grads, mesh, "2d"))
  np.testing.assert_allclose(got, expected, rtol=2e-5)
  assert np.all(np.isfinite(np.delete(got, 1)))  # ord=1 exceeds float32.


# ----------------------------------------------------------------------------
# shard_map and pmap: each device holds a shard; axis_name makes it global.

AXIS_NAME_TRANSFORMS = {
    # Whole-leaf norms: right for a leaf split any way.
    "clip_by_norm": lambda a: oc.clip_by_norm(0.5, axis_name=a),
    "clip_by_global_norm": lambda a: oc.clip_by_global_norm(1.0, axis_name=a),
    "clip_by_global_norm_ord1": lambda a: oc.clip_by_global_norm(
        10.0, ord=1, axis_name=a),
    "clip_by_global_norm_inf": lambda a: oc.clip_by_global_norm(
        0.2, ord=math.inf, axis_name=a),
    "clip_by_global_norm_rms": lambda a: oc.clip_by_global_norm(
        0.05, ord="rms", axis_name=a),
    "clip_by_global_norm_ord3": lambda a: oc.clip_by_global_norm(
        0.5, ord=3, axis_name=a),
    "clip_by_quantile": lambda a: oc.clip_by_quantile(
        0.5, window=4, axis_name=a),
    "clip_by_quantile_per_leaf": lambda a: oc.clip_by_quantile(
        0.5, window=4, per_leaf=True, axis_name=a),
    "zclip": lambda a: oc.zclip(ZSCORE, axis_name=a),
    "skip_step": lambda a: oc.skip_step(
        oc.clip_by_global_norm(1.0, axis_name=a), skip_norm=20.0,
        rule=SPIKE_EMA, axis_name=a),
    "clip_update_by_history": lambda a: oc.clip_update_by_history(
        window=2, num_std=0.5, axis_name=a),
}
SHARD_MAP_AXES = {"fsdp": "data", "2d": ("data", "model")}
OVERFLOW_NAMES = ["clip_by_global_norm", "clip_by_global_norm_ord1",
                  "clip_by_global_norm_inf", "clip_by_global_norm_rms",
                  "clip_by_global_norm_ord3", "zclip", "skip_step"]


def shard_map_suite(names: list[str], layout: str, scale: float = 1.0,
                    axis_name: Any = "all", check_vma: bool = True):
  """Runs transforms inside shard_map, each device holding its shards.

  Returns, per transform, the updates, the state as one value (``out_specs``
  ``P()``: with ``check_vma`` this type-checks only if it cannot differ
  between devices; ``None`` without), and the states of all devices stacked.
  """
  mesh = make_mesh(layout)
  every = SHARD_MAP_AXES[layout]
  axis_name = every if axis_name == "all" else axis_name
  grads = gradients(scale)
  in_specs = tree_specs(layout, grads, stacked=True)

  def body(grads):
    results = run_suite(names, grads, jax.tree.map(lambda x: x[0], grads),
                        make=lambda n: AXIS_NAME_TRANSFORMS[n](axis_name))
    return {n: (outs, state if check_vma else None,
                jax.tree.map(lambda x: x[None], state))
            for n, (outs, state) in results.items()}

  out_specs = {n: (in_specs, P(), P(every)) for n in names}
  fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(in_specs,),
                             out_specs=out_specs, check_vma=check_vma))
  return fn(put(grads, mesh, layout, stacked=True))


def assert_same_on_every_device(stacked: Any, what: str) -> None:
  for path, leaf in jax.tree_util.tree_leaves_with_path(stacked):
    leaf = np.asarray(leaf)
    np.testing.assert_array_equal(
        leaf, np.broadcast_to(leaf[:1], leaf.shape),
        err_msg=f"{what}{jax.tree_util.keystr(path)} differs between devices")


@pytest.mark.parametrize("layout", list(SHARD_MAP_AXES))
def test_shard_map_with_axis_name_matches_one_device(layout):
  # The scalar "gain" leaf is replicated (P()): it must count once, not once
  # per device; on the 2-D mesh "b1" is split over both axes at once.
  names = list(AXIS_NAME_TRANSFORMS)
  results = shard_map_suite(names, layout)
  expected = reference(names)
  for name, (outs, state, stacked) in results.items():
    assert_close(outs, expected[name][0], f"{name} updates")
    assert_close(state, expected[name][1], f"{name} state")
    assert_same_on_every_device(stacked, f"{name} state")


def test_shard_map_overflow_branch():
  # Gradients near 1e37: the plain sum of powers overflows and the rescaled
  # branch (a pmax, then a psum inside lax.cond) runs on every device.
  names = OVERFLOW_NAMES
  results = shard_map_suite(names, "2d", scale=1e36)
  expected = reference(names, 1e36)
  for name, (outs, state, stacked) in results.items():
    assert_close(outs, expected[name][0], f"{name} updates")
    assert_close(state, expected[name][1], f"{name} state")
    assert_same_on_every_device(stacked, f"{name} state")
    norm = np.asarray(state.stats.norm)
    if name != "clip_by_global_norm_ord1":  # Its true norm exceeds float32.
      assert np.isfinite(norm) and norm > 1e36, (name, norm)


def test_shard_map_global_norm_of_values_near_float32_max():
  # Entries of 1e38 on different devices (and in a replicated leaf): every
  # square overflows, the norm does not.
  mesh = make_mesh("2d")
  grads = {k: np.asarray(v[0]) for k, v in gradients().items()}
  grads["w1"][0, 0], grads["w1"][15, 31] = 2e38, -1e38  # Two devices.
  grads["gain"] = np.float32(1e38)  # Replicated.
  ords = [2, 3, math.inf, "rms"]
  flat = np.concatenate([np.ravel(v).astype(np.float64) for v in grads.values()])
  expected = [np.sqrt(np.sum(flat ** 2)), np.sum(np.abs(flat) ** 3) ** (1 / 3),
              np.max(np.abs(flat)), np.sqrt(np.mean(flat ** 2))]
  fn = jax.jit(jax.shard_map(
      lambda g: jnp.stack([oc.global_norm(g, ord=o, axis_name=("data", "model"))
                           for o in ords]),
      mesh=mesh, in_specs=(tree_specs("2d", grads),), out_specs=P()))
  got = fn(put(grads, mesh, "2d"))
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_shard_map_without_vma_tracking_splits_every_leaf():
  # With check_vma=False JAX keeps no record of which leaves are replicated:
  # every leaf counts as split over the named axes, so the replicated "gain"
  # is counted once per device (8 times) and "b1" once per "data" row (twice).
  name = "clip_by_global_norm"
  results = shard_map_suite([name], "2d", check_vma=False)
  _, _, stacked = results[name]
  assert_same_on_every_device(stacked, name)
  expected = reference([name])[name][1].stats.norm
  last = {k: np.float64(v[-1]) for k, v in gradients().items()}
  np.testing.assert_allclose(
      np.float64(stacked.stats.norm[0]) ** 2,
      np.float64(expected) ** 2 + 7 * last["gain"] ** 2
      + np.sum(last["b1"] ** 2), rtol=1e-5)


def test_shard_map_without_axis_name_clips_each_shard_alone():
  # The control: without axis_name each device sees only its shard's norm,
  # so states differ between devices and updates differ from one device's.
  name = "clip_by_global_norm"
  results = shard_map_suite([name], "fsdp", axis_name=None, check_vma=False)
  outs, _, stacked = results[name]
  assert len(set(np.asarray(stacked.stats.norm).tolist())) > 1
  with pytest.raises(AssertionError):
    assert_close(outs, reference([name])[name][0], "updates")


@pytest.mark.parametrize("layout", list(SHARD_MAP_AXES))
def test_shard_map_global_norm_is_one_scalar_psum(layout):
  # Partial sums are added on each device first (a replicated leaf's divided
  # by its number of copies), then one psum of one scalar crosses devices.
  mesh = make_mesh(layout)
  grads = jax.tree.map(lambda x: x[0], gradients())
  fn = jax.shard_map(
      lambda g: oc.global_norm(g, axis_name=SHARD_MAP_AXES[layout]),
      mesh=mesh, in_specs=(tree_specs(layout, grads),), out_specs=P())
  hlo = compiled_text(fn, put(grads, mesh, layout))
  main = collectives(hlo, entry_only=True)
  assert [(c["op"], c["sizes"]) for c in main] == [("all-reduce", [1])], main
  rest = collectives(hlo)  # Plus, in the rescaled branch, a pmax and a psum.
  assert [c["sizes"] for c in rest] == [[1]] * 3, rest


def test_pmap_with_axis_name_matches_one_device():
  # pmap: every leaf split along its first axis over the 8 devices.
  shapes = {"w": (8, 6), "b": (8,), "k": (8, 3, 4)}
  rng = np.random.default_rng(3)
  grads = {k: (rng.normal(size=s) * np.reshape(STEP_SCALES, (-1,) + (1,) * len(s))
               ).astype(np.float32) for k, s in shapes.items()}
  names = ["clip_by_global_norm", "clip_by_global_norm_inf", "zclip",
           "skip_step"]
  # Device axis first: (8, steps, 1, ...).
  split = jax.tree.map(lambda x: jnp.moveaxis(x[:, :, None], 1, 0), grads)
  results = jax.pmap(lambda g: run_suite(
      names, g, jax.tree.map(lambda x: x[0], g),
      make=lambda n: AXIS_NAME_TRANSFORMS[n]("d")), axis_name="d")(split)
  expected = jax.jit(lambda g: run_suite(
      names, g, jax.tree.map(lambda x: x[0], g),
      make=lambda n: AXIS_NAME_TRANSFORMS[n](None)))(grads)
  for name, (outs, states) in results.items():
    outs = jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1)[:, :, 0], outs)
    assert_close(outs, expected[name][0], f"pmap {name} updates")
    assert_same_on_every_device(states, f"pmap {name} state")
    assert_close(jax.tree.map(lambda x: x[0], states), expected[name][1],
                 f"pmap {name} state")


# ----------------------------------------------------------------------------
# Data parallel: each device computes a full gradient on its part of the batch.


def _dp_problem():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(64, 6)).astype(np.float32)
  y = (10 * rng.normal(size=(64, 3))).astype(np.float32)
  params = {"w": rng.normal(size=(6, 3)).astype(np.float32),
            "b": np.zeros(3, np.float32)}

  def loss(params, x, y):
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)

  return loss, params, x, y


def _twice(g: Any) -> Any:
  return jax.tree.map(lambda v: jnp.stack([v, v]), g)


@pytest.mark.parametrize("make", [
    lambda: oc.clip_by_global_norm(1.0),
    lambda: oc.zclip(oc.ZScore(warmup_steps=1), max_norm=1.0),
], ids=["clip_by_global_norm", "zclip"])
def test_data_parallel_clip_after_pmean_clips_the_batch_gradient(make):
  loss, params, x, y = _dp_problem()
  mesh = make_mesh("data")
  tx = make()  # The gradient is replicated after pmean: no axis_name.

  def body(params, x, y):
    # pcast: differentiate this device's loss alone, giving its own gradient.
    own = jax.grad(loss)(jax.lax.pcast(params, "data", to="varying"), x, y)
    g = jax.lax.pmean(own, "data")
    # Without the pcast, check_vma makes jax.grad of replicated params sum
    # the devices' gradients already: the same, up to 1/devices.
    summed = jax.grad(loss)(params, x, y)
    return (run_steps(tx, _twice(g), params),
            run_steps(tx, _twice(jax.tree.map(lambda s: s / 8, summed)), params))

  after, shortcut = jax.jit(jax.shard_map(
      body, mesh=mesh, in_specs=(P(), P("data"), P("data")),
      out_specs=P()))(params, x, y)
  g = jax.grad(loss)(params, x, y)  # The whole batch on one device.
  expected = jax.jit(lambda g: run_steps(tx, _twice(g), params))(g)
  for got in (after, shortcut):
    assert_close(got, expected, "updates and state")
  assert np.asarray([v for k, v in oc.clip_stats(after[1]).items()
                     if k.endswith("/num_clipped")][0]) > 0


def test_data_parallel_clip_before_pmean_clips_each_device_gradient():
  loss, params, x, y = _dp_problem()
  mesh = make_mesh("data")
  tx = oc.clip_by_global_norm(1.0)

  def body(params, x, y):
    own = jax.grad(loss)(jax.lax.pcast(params, "data", to="varying"), x, y)
    u, state = tx.update(own, tx.init(params), params)
    # Each device's state holds its own gradient's norm: stack, not P().
    return jax.lax.pmean(u, "data"), jax.tree.map(lambda s: s[None], state)

  u, states = jax.jit(jax.shard_map(
      body, mesh=mesh, in_specs=(P(), P("data"), P("data")),
      out_specs=(P(), P("data"))))(params, x, y)
  # Reference: clip each eighth of the batch's gradient, then average.
  per_device = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(
      params, x.reshape(8, 8, -1), y.reshape(8, 8, -1))
  clipped, ref_states = jax.vmap(
      lambda g: tx.update(g, tx.init(params), params))(per_device)
  assert_close(u, jax.tree.map(lambda c: c.mean(0), clipped), "updates")
  assert_close(states, ref_states, "per-device states")
  # A different algorithm: not the clipped batch gradient.
  batch, _ = tx.update(jax.grad(loss)(params, x, y), tx.init(params), params)
  assert not np.allclose(u["w"], batch["w"], rtol=1e-3)


def test_data_parallel_under_jit_needs_no_axis_name():
  # With the batch sharded and params replicated, jax.grad under jit already
  # returns the batch gradient: clipping it needs nothing more.
  loss, params, x, y = _dp_problem()
  mesh = make_mesh("data")
  opt = optax.chain(oc.clip_by_global_norm(1.0), optax.adamw(1e-2))

  def train(params, x, y):
    state = opt.init(params)
    for _ in range(3):
      g = jax.grad(loss)(params, x, y)
      u, state = opt.update(g, state, params)
      params = optax.apply_updates(params, u)
    return params, state

  batch = NamedSharding(mesh, P("data"))
  got = jax.jit(train)(jax.device_put(params, NamedSharding(mesh, P())),
                       jax.device_put(x, batch), jax.device_put(y, batch))
  expected = jax.jit(train)(*one_device((params, x, y)))
  assert_close(got, expected, "params and state")
