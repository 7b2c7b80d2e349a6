"""The same numbers on one device and on eight.

The suite runs on 8 host devices; most users run on one. These tests run the
kernels' and the classic clippers' tests again in a one-device process, and
compare every transform's results between a one-device process and this one,
leaf by leaf.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optaxclip as oc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The norm and scale kernels and the clippers built most directly on them run
# again on one device; every transform's results are compared across the two
# settings by test_every_transform_agrees_between_one_and_eight_devices below.
CORE = ["tests/test_norms.py", "tests/test_numerics.py",
        "tests/test_clipping.py",
        "tests/test_devices.py::test_one_device_mesh_with_explicit_axes"]

from_eight = pytest.mark.skipif(
    jax.device_count() == 1, reason="runs the one-device side from 8 devices")


def _one_device_env():
  env = dict(os.environ, OPTAXCLIP_TEST_DEVICES="1", JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return env


@pytest.mark.slow
@from_eight
def test_core_suite_on_one_device():
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
       "-p", "no:randomly", "-m", "not slow", *CORE],
      cwd=ROOT, env=_one_device_env(), capture_output=True, text=True,
      timeout=1800)
  tail = proc.stdout[-3000:] + proc.stderr[-2000:]
  assert proc.returncode == 0, tail
  assert " passed" in proc.stdout.splitlines()[-1], tail


# A battery of inputs: same-shape leaves (stacked on the cold path), huge and
# tiny values, mixed dtypes, a zero leaf; three steps, the last a spike (8
# times the norm of the one before), so that the spike rules act.
_BATTERY = r'''
import json, math, sys
import jax, jax.numpy as jnp, numpy as np, optax
import optaxclip as oc

STEP_SCALES = (0.25, 0.125, 1.0)

def trees():
  rng = np.random.default_rng(7)
  base = {f"l{i}": {"k": rng.normal(size=(6, 4)).astype(np.float32),
                    "b": rng.normal(size=4).astype(np.float32)}
          for i in range(5)}
  base["h"] = rng.normal(size=(3,)).astype(np.float16)
  base["z"] = np.zeros((2, 2), np.float32)
  out = {"normal": base}
  for name, s in (("huge", 1e37), ("tiny", 1e-30)):  # Finite in float32.
    t = jax.tree.map(lambda x: x.astype(np.float32) * np.float32(s), base)
    t["l3"]["k"] = t["l3"]["k"] * 7  # One leaf of a group stands out.
    out[name] = t
  return out

def transforms():
  return {
      "global": oc.clip_by_global_norm(1.0),
      "global_l1": oc.clip_by_global_norm(1.0, ord=1),
      "global_rms": oc.clip_by_global_norm(1e-3, ord="rms"),
      "global_inf": oc.clip_by_global_norm(1.0, ord=math.inf),
      "global_reproducible": oc.clip_by_global_norm(1.0, reproducible=True),
      "norm": oc.clip_by_norm(0.5),
      "norm_axis": oc.clip_by_norm(0.5, axis=-1, ord=3),
      "value": oc.clip_by_value(0.5, full_stats=True),
      "agc": oc.adaptive_grad_clip(0.01),
      "quantile": oc.clip_by_quantile(0.5, window=3),
      "zclip": oc.zclip(oc.ZScore(warmup_steps=2)),
      "adagc": oc.adagc(warmup_steps=1, max_norm=1.0),
      "check_finite": oc.check_finite(),
      "spikes": oc.clip_spikes(2.0, decay=0.9),
      "spike_clipped": oc.spike_clipped(optax.adam(0.1), max_ratio=2.0),
      "skip": oc.skip_step(optax.sgd(0.1), skip_norm=1e30),
      "skip_ema": oc.skip_step(
          optax.sgd(0.1), rule=oc.SpikeEMA(max_ratio=4.0, warmup_steps=2)),
      "skip_window": oc.skip_step(
          optax.sgd(0.1), rule=oc.SpikeWindow(
              window=4, min_history=2, watch="norm")),
      "global_mask": oc.clip_by_global_norm(
          1.0, mask={**{f"l{i}": i % 2 == 0 for i in range(5)},
                     "h": True, "z": False}),
      "norm_layers": oc.clip_by_norm(0.5, layer_axis={
          **{f"l{i}": {"k": 0, "b": None} for i in range(5)},
          "h": None, "z": 1}),
      "update_rms": oc.clip_update_rms(optax.adam(0.1)),
      "update_history": oc.clip_update_by_history(window=3, min_history=2),
      "spectral": oc.clip_by_spectral_norm(1.0),
      "loss_scale": oc.dynamic_loss_scale(
          optax.sgd(0.1), init_scale=1024.0, growth_interval=2),
  }

RAW = {}  # Every run's last updates and state, by "<tree>/<transform>".

def run():
  # One jit per transform, run on every tree (it compiles once per dtype).
  res = {}
  inputs = {name: [jax.tree.map(lambda x: jnp.asarray(x * x.dtype.type(s)), tree)
                   for s in STEP_SCALES]
            for name, tree in trees().items()}
  for name, tx in transforms().items():
    step = jax.jit(tx.update)
    for tname, steps in inputs.items():
      params = jax.tree.map(lambda x: jnp.ones_like(x) * 0.1, steps[0])
      state = tx.init(params)
      for g in steps:
        u, state = step(g, state, params)
      RAW[f"{tname}/{name}"] = (u, state)
      res[f"{tname}/{name}"] = [np.asarray(x, np.float64).tolist()
                                for x in jax.tree.leaves((u, state))]
  return res

# The same gradient values on every layout this process can make (8 devices
# here, 1 in the one-device process): the global norm, by each accumulation,
# and the reproducible clip's norm and update. "ones" holds N = 328 ones, whose
# norm is float32(sqrt(328)) exactly on every layout.
def layout_trees():
  rng = np.random.default_rng(11)
  vals = {"w": rng.normal(size=(16, 8)).astype(np.float32),
          "b": (rng.normal(size=(8,)) * 1e3).astype(np.float32),
          "e": (rng.normal(size=(24, 8)) * 1e-3).astype(np.float32)}
  return {"vals": vals, "ones": jax.tree.map(np.ones_like, vals)}

def _norms(g, axis_name=None):
  clip = oc.clip_by_global_norm(1.0, axis_name=axis_name, reproducible=True)
  u, s = clip.update(g, clip.init(g))
  return {"global_norm": oc.global_norm(g, axis_name=axis_name),
          "norm_parts": oc.norm_parts(g, axis_name=axis_name).norm(),
          "clip_norm": s.stats.norm, "clip_w": u["w"]}

def layouts():
  P, NS = jax.sharding.PartitionSpec, jax.sharding.NamedSharding
  n = jax.device_count()
  m1 = jax.make_mesh((n,), ("d",))
  m2 = jax.make_mesh((2, n // 2) if n > 1 else (1, 1), ("d", "m"))
  placements = {  # leaf -> spec; "b" replicated or split over one axis only
      "replicated": (m1, {"w": P(), "b": P(), "e": P()}),
      "sharded": (m1, {"w": P("d"), "b": P("d"), "e": P("d")}),
      "partly_replicated": (m1, {"w": P("d"), "b": P(), "e": P(None, "d")}),
      "2d": (m2, {"w": P("d", "m"), "b": P("m"), "e": P(None, "m")}),
  }
  out = {}
  for tname, tree in layout_trees().items():
    res = {"unsharded": jax.jit(_norms)(tree)}
    for lname, (mesh, specs) in placements.items():
      put = {k: jax.device_put(v, NS(mesh, specs[k])) for k, v in tree.items()}
      res[f"jit_{lname}"] = jax.jit(_norms)(put)
      names = mesh.axis_names if len(mesh.axis_names) > 1 else mesh.axis_names[0]
      for vma in (True, False):
        if not vma and lname != "sharded":
          continue  # without the record, every leaf must be split
        res[f"shard_map_{lname}_vma={vma}"] = jax.jit(jax.shard_map(
            lambda g: {k: v for k, v in _norms(g, names).items()
                       if k != "clip_w"},
            mesh=mesh, in_specs=(specs,), out_specs=P(),
            check_vma=vma))(put)
    split = {k: v.reshape((n, -1) + v.shape[1:]) for k, v in tree.items()}
    res["pmap"] = {k: v[0] for k, v in jax.pmap(
        lambda g: {k: v for k, v in _norms(g, "d").items() if k != "clip_w"},
        axis_name="d")(split).items()}
    # Two pipeline halves, "w" tied: counted by the first stage only; the
    # stages agree on the peak first, as separate programs would.
    first = {"w": tree["w"], "b": tree["b"]}
    second = {"w": tree["w"], "e": tree["e"]}
    keep = {"w": False, "e": True}
    peak = jnp.maximum(oc.norm_parts(first, ord=math.inf).norm(),
                       oc.norm_parts(second, mask=keep, ord=math.inf).norm())
    both = (oc.norm_parts(first, peak=peak)
            + oc.norm_parts(second, mask=keep, peak=peak))
    res["pipeline_halves"] = {"norm_parts": both.norm(), "limbs": both.limbs}
    res["tied_counted_twice"] = {"norm_parts": (
        oc.norm_parts(first, peak=peak) + oc.norm_parts(second, peak=peak)
    ).norm()}
    for lname, r in res.items():
      for k, v in r.items():
        out[f"{tname}/{lname}/{k}"] = np.asarray(v, np.float64).tolist()
  return out

if __name__ == "__main__":
  json.dump({"run": run(), "layouts": layouts()}, open(sys.argv[1], "w"))
'''


@pytest.mark.slow
@from_eight
def test_every_transform_agrees_between_one_and_eight_devices(tmp_path):
  script = tmp_path / "battery.py"
  script.write_text(_BATTERY)
  out = tmp_path / "one.json"
  proc = subprocess.run([sys.executable, str(script), str(out)], cwd=ROOT,
                        env=_one_device_env(), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  both = json.loads(out.read_text())
  one = both["run"]
  namespace: dict = {}
  exec(compile(_BATTERY, "battery", "exec"), namespace)  # noqa: S102
  _check_layouts(both["layouts"], namespace["layouts"]())
  here = namespace["run"]()
  assert jax.device_count() > 1 and set(one) == set(here)
  for key in here:
    assert len(one[key]) == len(here[key]), key
    for a, b in zip(one[key], here[key]):
      if key.endswith("/global_reproducible"):  # bit for bit
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a),
                                      err_msg=key)
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-6,
                                 atol=0, err_msg=key)
  # The spike rules acted on the last step of the normal tree (else only
  # their pass-through would be compared): skip_step's two rules skipped it,
  # the SPAM rules clipped elements of it.
  raw = {k.split("/")[1]: state for k, (_, state) in namespace["RAW"].items()
         if k.startswith("normal/")}
  assert raw["skip_ema"].skipped and raw["skip_window"].skipped
  assert raw["skip_ema"].num_skipped == raw["skip_window"].num_skipped == 1
  assert raw["spikes"].num_spikes > 0 and raw["spike_clipped"].num_spikes > 0
  # The spectral clip clipped; the loss scale grew once (3 good steps of 2).
  assert raw["spectral"].stats.num_clipped > 0
  assert float(raw["loss_scale"].loss_scale) == 2048.0


def _check_layouts(one: dict, here: dict) -> None:
  """The battery's ``layouts()`` from one device and from eight."""
  assert set(one) == set(here) and len(here) > 50
  sqrt_n = np.float64(np.float32(np.sqrt(328.0)))
  for key, value in here.items():
    tree, layout, what = key.split("/")
    if what == "limbs":
      continue
    if tree == "ones" and what != "clip_w" and layout != "tied_counted_twice":
      # All ones: exactly sqrt(N), by every accumulation, on every layout.
      assert value == sqrt_n == one[key], key
    if layout == "tied_counted_twice":
      np.testing.assert_array_equal(value, one[key], err_msg=key)
    elif what in ("norm_parts", "clip_norm", "clip_w"):
      # The exact accumulation: the same bits on 1 and 8 devices, and on
      # every layout of either.
      np.testing.assert_array_equal(value, one[key], err_msg=key)
      np.testing.assert_array_equal(
          value, here[f"{tree}/unsharded/{what}"], err_msg=key)
    elif what == "global_norm":  # float32 sums: to rounding.
      np.testing.assert_allclose(value, one[key], rtol=2e-6, err_msg=key)
  for tree in ("ones", "vals"):
    # The tied weight counted once: the norm of the whole tree; counted by
    # both halves it would read high.
    once = here[f"{tree}/pipeline_halves/norm_parts"]
    assert once == here[f"{tree}/unsharded/norm_parts"]
    assert here[f"{tree}/tied_counted_twice/norm_parts"] > once
  np.testing.assert_allclose(
      here["vals/unsharded/norm_parts"],
      np.sqrt(sum(np.sum(np.square(v.astype(np.float64))) for v in
                  _layout_values().values())), rtol=1e-6)


def _layout_values() -> dict:
  namespace: dict = {}
  exec(compile(_BATTERY, "battery", "exec"), namespace)  # noqa: S102
  return namespace["layout_trees"]()["vals"]


# Transforms of per-example gradients (tests/test_per_example.py and
# tests/test_dp.py run them on meshes), of attention logits (qk_clip:
# tests/test_qk_clip.py), and functions that are no transforms: statistics,
# norms (norm_parts runs in layouts() above), and state utilities
# (adopt_state maps one state tree onto another; loss_scale reads the state
# of dynamic_loss_scale, which is in the battery).
_NOT_IN_BATTERY = {
    "clipped_grad", "per_example_clip", "quantile_norm", "dp_aggregate",
    "dp_noise", "qk_clip", "max_logit_attention", "gather_max_logits",
    "clip_stats", "global_norm", "raise_if_nonfinite", "layer_axes",
    "norm_parts", "adopt_state", "loss_scale"}


def test_every_public_transform_is_in_the_battery():
  namespace: dict = {}
  exec(compile(_BATTERY, "battery", "exec"), namespace)  # noqa: S102
  params = namespace["trees"]()["normal"]
  covered = set()
  for tx in namespace["transforms"]().values():
    covered |= {k.split("/")[0] for k in oc.clip_stats(tx.init(params))}
  public = {name for name in oc.__all__
            if name[0].islower() and name not in _NOT_IN_BATTERY}
  assert public <= covered, f"add to the battery: {sorted(public - covered)}"


@pytest.mark.slow
def test_one_device_mesh_with_explicit_axes():
  # A mesh of one device (Explicit axes, make_mesh's default) with sharded
  # and replicated leaves of one shape: every transform runs and matches the
  # unsharded result.
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  rng = np.random.default_rng(0)
  g = {"a": rng.normal(size=(8, 4)).astype(np.float32) * 3e37,
       "b": rng.normal(size=(8, 4)).astype(np.float32),
       "c": rng.normal(size=4).astype(np.float32)}
  specs = {"a": jax.P("data"), "b": jax.P(), "c": jax.P()}
  sharded = {k: jax.device_put(v, jax.NamedSharding(mesh, specs[k]))
             for k, v in g.items()}
  txs = (oc.clip_by_global_norm(1.0), oc.clip_by_norm(1.0),
         oc.clip_by_value(0.1, full_stats=True), oc.zclip(),
         oc.skip_step(optax.sgd(0.1)), oc.adaptive_grad_clip(0.1))
  # Every transform in one program, compiled once per setting.
  run = jax.jit(lambda g: [tx.update(g, tx.init(g), g)[0] for tx in txs])
  for got, want in zip(run(sharded), run(jax.tree.map(jnp.asarray, g))):
    for k in g:
      np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]),
                                 rtol=1e-6)
  np.testing.assert_allclose(float(oc.global_norm(sharded)),
                             float(oc.global_norm(g)), rtol=1e-6)
