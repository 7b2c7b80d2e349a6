"""Smoke test of the benchmark harness: quick mode on a tiny tree."""

import json
import os

import pytest

from benchmarks import __main__ as bench
from benchmarks import report, suite

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
  out = tmp_path_factory.mktemp("results")
  argv = ["--quick", "--trees", "tiny", "--dtypes", "float32,bfloat16",
          "--only", "value,global_norm", "--reps", "2", "--warmup", "1",
          "--chained-reps", "2", "--compile-reps", "1", "--no-progress",
          "--out", str(out), "--name", "smoke"]
  paths = bench.main(argv)
  return out, paths


def test_writes_json_markdown_and_png(outputs):
  out, paths = outputs
  names = sorted(os.path.basename(p) for p in paths)
  assert names == ["smoke.json", "smoke.md", "smoke.png"]
  for p in paths:
    assert os.path.getsize(p) > 0
  with open(out / "smoke.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_json_fields(outputs):
  out, _ = outputs
  with open(out / "smoke.json") as f:
    data = json.load(f)
  meta = data["meta"]
  for key in ("command", "platform", "device", "versions", "config"):
    assert key in meta
  assert meta["config"]["trees"] == ["tiny"]
  rows = data["rows"]
  sections = {r["section"] for r in rows}
  assert sections == {"standalone", "norm", "chained", "compile"}
  names = {r["name"] for r in rows if r["section"] == "standalone"}
  assert {"in-place scale (bound)", "optaxclip.clip_by_value", "optax.clip",
          "optaxclip.clip_by_global_norm",
          "optax.clip_by_global_norm"} <= names
  if suite.torch_available():
    assert "torch clip_grad_norm_(foreach)" in names
  for r in rows:
    if r["section"] in ("standalone", "norm"):
      assert r["time_ms"] > 0 and r["gbps"] > 0 and r["frac_bound"] > 0
      assert r["bytes"] == r["passes"] * r["tree_bytes"]
      assert r["dtype"] in ("float32", "bfloat16")
    if r["section"] == "chained":
      assert r["ratio"] == pytest.approx(r["time_ms"] / r["adamw_ms"])
    if r["section"] == "compile":
      assert r["optaxclip_s"] > 0 and r["optax_s"] > 0
  gn = [r for r in rows if r["section"] == "standalone"
        and r["name"] == "optaxclip.clip_by_global_norm"]
  assert {r["dtype"] for r in gn} == {"float32", "bfloat16"}
  assert all(r["passes"] == 3 for r in gn)


def test_targets_and_markdown(outputs):
  out, _ = outputs
  with open(out / "smoke.json") as f:
    data = json.load(f)
  targets = {t["target"]: t for t in data["targets"]}
  t = targets["clip_by_global_norm time / optax.clip_by_global_norm"]
  assert t["limit"] == 1.0 and t["kind"] == "max"
  assert t["met"] == (t["value"] <= 1.0)
  md = (out / "smoke.md").read_text()
  assert "## Standalone update" in md and "## Chained with AdamW" in md
  assert md.strip() == report.markdown(data["meta"], data["rows"],
                                       data["targets"]).strip()


_ONE_DEVICE = r"""
import jax, jax.numpy as jnp, numpy as np, optaxclip as oc
assert jax.device_count() == 1
rng = np.random.default_rng(0)
g = {"big": rng.normal(size=(300, 300)).astype(np.float32),
     "b1": rng.normal(size=(7,)).astype(np.float32),
     "b2": rng.normal(size=(5, 3)).astype(np.float32),
     "h": rng.normal(size=(9,)).astype(np.float16)}
x = np.concatenate([np.ravel(v).astype(np.float64) for v in g.values()])
gj = jax.tree.map(jnp.asarray, g)
for o in (2, 1, np.inf, 3):
  np.testing.assert_allclose(float(oc.global_norm(gj, ord=o)), np.linalg.norm(x, o),
                             rtol=1e-5)
huge = dict(gj, big=gj["big"] * 1e35)
xh = np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in huge.values()])
np.testing.assert_allclose(float(oc.global_norm(huge)), np.linalg.norm(xh),
                           rtol=1e-5)
for lo in (None, -0.3):
  tx = oc.clip_by_value(0.5, min_value=lo, full_stats=True)
  u, st = jax.jit(tx.update)(gj, tx.init(gj))
  c = np.concatenate([np.ravel(np.clip(v, np.asarray(-0.5 if lo is None else lo,
                                                     v.dtype),
                                       np.asarray(0.5, v.dtype))).astype(np.float64)
                      for v in g.values()])
  np.testing.assert_allclose(float(st.stats.scale),
                             np.linalg.norm(c) / np.linalg.norm(x), rtol=1e-5)
  np.testing.assert_allclose(float(st.stats.frac_clipped), np.mean(c != x),
                             rtol=1e-6)
  assert bool(st.stats.clipped)
print("ok")
"""


def test_one_device_paths_match_numpy():
  """The benchmarks run on one device, where small leaves are concatenated."""
  import subprocess
  import sys
  env = dict(os.environ, XLA_FLAGS="")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", _ONE_DEVICE], env=env, cwd=root,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().endswith("ok")


def test_train_step_quick(tmp_path):
  """The whole-step benchmark: tiny model, the bare step and two clippers."""
  from benchmarks import train_step
  only = ["oc.clip_by_global_norm(1.0)", "oc.skip_step(adamw)"]
  argv = ["--quick", "--out", str(tmp_path), "--name", "smoke"]
  for name in only:
    argv += ["--only", name]
  paths = train_step.main(argv)
  assert sorted(os.path.basename(p) for p in paths) == ["smoke.json",
                                                        "smoke.md"]
  with open(tmp_path / "smoke.json") as f:
    data = json.load(f)
  assert data["meta"]["rounds"] == 2 and data["meta"]["model"]["layers"] == 1
  rows = {r["name"]: r for r in data["rows"]}
  assert list(rows) == [train_step.BARE] + only
  assert rows[train_step.BARE]["ratio"] == 1.0
  for r in rows.values():
    assert r["ms"] > 0 and r["kernels"] > 0
  assert rows["oc.clip_by_global_norm(1.0)"]["target"] == train_step.TARGET
  assert rows["oc.skip_step(adamw)"]["target"] == train_step.GUARD_TARGET
  md = (tmp_path / "smoke.md").read_text()
  for name in rows:
    assert f"| `{name}` |" in md


def test_train_step_cases():
  """Every clipper of the comparison, each with or without a target."""
  from benchmarks import train_step
  table = train_step.cases()
  assert next(iter(table)) == train_step.BARE
  assert len(table) == 13
  for name, (impl, _) in table.items():
    assert (train_step.target(name, impl) is not None) == name.startswith("oc.")


def test_adaptivity_lock_in(tmp_path):
  """The lock-in benchmark on 500 steps at 1% noise: the published rules
  lock in where they do at full size, levanter's never; the table lists
  every method run, and the committed table every method there is."""
  from benchmarks import adaptivity
  refs = list(adaptivity.references())
  argv = ["--quick", "--steps", "500", "--change", "100", "--noises", "0.01",
          "--quiet", "--out", str(tmp_path), "--name", "smoke"]
  for label in ["zclip()", "adagc()", *refs]:
    argv += ["--only", label]
  paths = adaptivity.main(argv)
  assert sorted(os.path.basename(p) for p in paths) == [
      "smoke.json", "smoke.md", "smoke.png"]
  with open(tmp_path / "smoke.json") as f:
    data = json.load(f)
  assert list(data["methods"]) == ["zclip()", "adagc()", *refs]

  def cell(label, scenario):
    return data["methods"][label]["noise"]["0.01"]["scenarios"][scenario]

  def locked(label, scenario):
    c = cell(label, scenario)
    return c["share"] >= 0.9 and c["recovery"] is None

  def follows(label, scenario, design=0.0):
    c = cell(label, scenario)
    return c["share"] <= design + 0.05 and c["recovery"] is not None \
        and c["recovery"] <= 100
  for scenario in ("rise x1.5", "rise x3", "rise x10", "drift x10"):
    assert locked("ZClip (reference code)", scenario), scenario
    assert follows("levanter clip_update_by_historical_norm", scenario)
    assert follows("levanter SkipStep (norm)", scenario)
  for scenario in ("rise x3", "rise x10", "drift x10"):
    assert locked("AdaGC (official code)", scenario), scenario
  for label in ("AutoClip (paper code, 90th percentile)",
                "AutoClip (package QuantileClip)"):
    assert locked(label, "drift x10")
    assert follows(label, "rise x10", design=0.1)
  for label in refs:
    assert follows(label, "fall x0.5")
    assert cell(label, "steady")["spikes_caught"] == 3
  md = (tmp_path / "smoke.md").read_text()
  for label in ["zclip()", "adagc()"]:
    assert f"| `{label}` |" in md
  for label in refs:
    assert f"| ref: {label} |" in md
  committed = os.path.join(adaptivity.RESULTS, "adaptivity-cpu.md")
  text = open(committed).read()
  for label in adaptivity.methods():
    assert f"| `{label}` |" in text, label
  for label in refs:
    assert f"| ref: {label} |" in text, label


def test_device_headline_tiny(tmp_path):
  """``python -m benchmarks --device --tiny``: every headline group with the
  rows of its size (the accelerator size has them all), each with positive
  finite figures, in files named by the device kind; and with no budget
  left, every group left out and said so."""
  import math
  import re

  import jax

  from benchmarks import device
  kind = re.sub(r"[^a-z0-9]+", "-", jax.devices()[0].device_kind.lower())
  paths = bench.main(["--device", "--tiny", "--quiet", "--out",
                      str(tmp_path)])
  stem = f"device-{kind.strip('-')}-tiny"
  assert sorted(os.path.basename(p) for p in paths) == [
      stem + ".json", stem + ".md"]
  with open(tmp_path / (stem + ".json")) as f:
    data = json.load(f)
  meta = data["meta"]
  assert meta["command"] == "python -m benchmarks.device --tiny --quiet" \
      " --out " + str(tmp_path)
  assert meta["device_kind"] == jax.devices()[0].device_kind
  assert meta["versions"]["jax"] == jax.__version__ and meta["date_utc"]
  assert meta["skipped"] == [] and 0 < meta["elapsed_s"] < meta["budget_s"]
  bound = "in-place scale (bound)"
  expected = {
      "norm": ({bound, "optaxclip.global_norm", "optax.tree.norm"},
               ("time_ms", "gbps", "frac_bound")),
      "standalone": ({bound, "optaxclip.clip_by_global_norm",
                      "optax.clip_by_global_norm"},
                     ("time_ms", "gbps", "frac_bound")),
      "chained": ({"chain(optaxclip.clip_by_global_norm, adamw)",
                   "chain(optax.clip_by_global_norm, adamw)"},
                  ("time_ms", "adamw_ms", "ratio", "bytes_bound_ratio")),
      "compile": ({"chain(oc.clip_by_global_norm, adamw)",
                   "chain(optax.clip_by_global_norm, adamw)"},
                  ("compile_s", "ratio")),
      "train_step": ({"adamw", "oc.clip_by_global_norm(1.0)"},
                     ("ms", "ratio", "paired_ratio", "compile_s")),
      "ghost": ({"non-private", "ghost"},
                ("temp_mib", "total_mib", "total_over_plain", "compile_s")),
  }
  full = device.SIZES["accelerator"]
  assert full.train_cases == ("adamw", "oc.clip_by_global_norm(1.0)",
                              "optax.clip_by_global_norm(1.0)",
                              "oc.skip_step(adamw)")
  assert full.ghost_methods == ("non-private", "ghost", "vmap")
  assert full.tree == "gpt2" and set(full.estimate_s) == set(device.GROUPS)
  md = (tmp_path / (stem + ".md")).read_text()
  for group, (names, keys) in expected.items():
    rows = [r for r in data["rows"] if r["group"] == group]
    assert {r["name"] for r in rows} == names, group
    for r in rows:
      assert f"| `{r['name']}` |" in md
      for k in keys:
        v = r[k]
        assert isinstance(v, (int, float)) and math.isfinite(v) and v > 0, (
            group, r["name"], k, v)
  chained = next(r for r in data["rows"] if r["group"] == "chained")
  assert chained["ratio"] == pytest.approx(
      chained["time_ms"] / chained["adamw_ms"])
  paths = device.main(["--tiny", "--quiet", "--budget-s", "0", "--out",
                       str(tmp_path), "--name", "none"])
  with open(tmp_path / "none.json") as f:
    data = json.load(f)
  assert data["rows"] == [] and data["meta"]["skipped"] == list(device.GROUPS)
  assert "left out:** " + ", ".join(device.GROUPS) in (
      tmp_path / "none.md").read_text()
