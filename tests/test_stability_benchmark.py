"""The learning-rate sensitivity benchmark: its measures, and a quick run.

The measures are checked on made-up runs; ``python -m benchmarks.stability
--quick`` (every task, tiny models, 3 learning rates, 1 seed) runs once for
the module with one row of each kind the harness treats apart (a threshold
measured from ``no clipping``, an adaptive clipper, a guard, the rows that
read Adam's moment or the attention logits, a model variant), and its files
are checked for real content. Every row is built (``methods`` constructs
them all); ``--quick`` without ``--methods`` runs them all. The quick run
compiles 17 programs: it is marked ``slow``.
"""

import json
import math

import numpy as np
import pytest

from benchmarks import stability

TASKS = ("transformer", "regression", "lstm")
CLIPPERS = ("clip_by_global_norm(1.0)", "clip_by_global_norm(tuned)",
            "clip_by_norm(1.0)", "clip_by_quantile(0.9)",
            "clip_by_quantile(0.9, per_leaf)", "zclip()", "adagc()",
            "clip_spikes()", "skip_step(zclip())")
# The guards on the loss and the update: --quick runs those that read Adam's
# moment or the attention logits on the transformer, the others on the SGD
# tasks (the full run: those on every task).
ADAM_ONLY = ("clip_update_rms()", "qk_clip()")
SGD_QUICK = ("skip_step(SpikeWindow())", "clip_update_by_history()")
SKIPPERS = ("skip_step(zclip())", "skip_step(SpikeWindow())")
# The rows the smoke run trains: one of each kind.
SMOKE = ("clip_by_global_norm(tuned)", "zclip()", "skip_step(zclip())",
         "skip_step(SpikeWindow())", "clip_update_rms()", "qk_clip()",
         "QK-layernorm (model)")


def runs(final, initial=2.0):
  """A made-up record of 3 learning rates x 2 seeds."""
  final = np.asarray(final, np.float32)
  loss = np.ones(final.shape + (30,), np.float32)
  return {"final": final, "initial": np.full(final.shape, initial, np.float32),
          "counts": {"zclip/num_clipped": np.full(final.shape, 3)},
          "trace": {"loss": loss, "grad_norm": np.full(loss.shape, 0.5)},
          "compile_s": 1.0, "run_s": 1.0}


def test_sensitivity_caps_divergent_runs_at_the_initial_loss():
  s = stability.summarize(runs([[1.0, 1.2], [0.5, 0.7], [np.nan, 3.0]]),
                          [0.1, 1.0, 10.0])
  assert s["loss"] == pytest.approx([1.1, 0.6, 2.0])
  assert s["best_loss"] == pytest.approx(0.6) and s["best_lr"] == 1.0
  assert s["sensitivity"] == pytest.approx((0.5 + 0.0 + 1.4) / 3)
  assert s["diverged"] == [0, 0, 2] and s["num_diverged"] == 2
  assert s["frac_clipped"] == pytest.approx(3 / 30)
  assert s["frac_skipped"] is None
  assert s["sensitivity_per_seed"] == pytest.approx([(0.5 + 1.5) / 3,
                                                     (0.5 + 1.3) / 3])
  lrs = [0.1, 1.0, 10.0]
  assert stability.largest_good_lr(s, lrs, 0.6, ("+", 0.05)) == 1.0
  assert stability.largest_good_lr(s, lrs, 0.55, ("+", 0.05)) is None
  assert stability.largest_good_lr(s, lrs, 0.55, ("x", 2.0)) == 1.0


def test_loss_spikes_use_the_examples_definition():
  loss = np.ones(60)
  loss[30] = 1.3  # Above 1.25 x the mean of the 20 before it.
  loss[45] = 1.2  # Below.
  assert stability.loss_spikes(loss) == 1
  loss[50:] = np.nan  # Counted up to the first non-finite loss.
  loss[55] = 9.0
  assert stability.loss_spikes(loss) == 1
  assert stability.loss_spikes(np.ones(10)) == 0


def test_healthy_norm_is_the_median_at_the_best_learning_rate():
  r = runs([[1.0, 1.0], [0.5, 0.5], [3.0, 3.0]])
  r["trace"]["grad_norm"][1] = np.linspace(1.0, 3.0, 30)
  r["trace"]["grad_norm"][1, 0, -1] = np.inf  # Left out.
  assert stability.healthy_norm(r, [0.1, 1.0, 10.0]) == pytest.approx(2.0,
                                                                     rel=0.02)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  out = tmp_path_factory.mktemp("stability")
  paths = stability.main(["--quick", "--no-progress", "--out", str(out),
                          "--name", "smoke", "--methods", ",".join(SMOKE)])
  return out, paths


@pytest.mark.slow
def test_quick_run_writes_json_markdown_and_a_figure_per_task(quick):
  out, paths = quick
  names = sorted(p.split("/")[-1] for p in paths)
  assert names == sorted(["smoke.json", "smoke.md"]
                         + [f"smoke-{t}.png" for t in TASKS])
  for t in TASKS:
    assert (out / f"smoke-{t}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  md = (out / "smoke.md").read_text()
  assert "Quick mode" in md
  for t in TASKS:
    assert f"## {t}:" in md and f"(smoke-{t}.png)" in md


@pytest.mark.slow
def test_quick_run_measures_every_task_and_method(quick):
  out, _ = quick
  data = json.loads((out / "smoke.json").read_text())
  meta = data["meta"]
  assert meta["quick"] is True and meta["seeds"] == 1
  assert meta["wall_s"] > 0 and "--name smoke --methods" in meta["command"]
  assert list(data["tasks"]) == list(TASKS)
  for name, t in data["tasks"].items():
    lrs = t["lrs"]
    assert len(lrs) == 3 and lrs == sorted(lrs)
    assert math.isfinite(t["initial"]) and t["initial"] > 0
    assert 0 < t["best_loss"] < t["initial"]
    assert math.isfinite(t["tuned"]) and t["tuned"] > 0
    assert t["tuned_from_lr"] in lrs
    methods = t["methods"]
    adam = name == "transformer"
    built = set(stability.methods(stability.tasks_mod.TASKS[name](quick=True),
                                  30, 1.0))
    assert set(CLIPPERS) <= built
    assert set(ADAM_ONLY if adam else SGD_QUICK) <= built
    assert any(k.startswith("clip_by_value(") for k in built)
    assert any(k.startswith("adaptive_grad_clip(") for k in built)
    skip = stability.QUICK_SKIP.get(name, ())
    assert set(methods) == {"no clipping"} | {k for k in SMOKE
                                              if k in built and k not in skip}
    if adam:
      ref = methods["QK-layernorm (model)"]
      assert ref["frac_clipped"] is None and ref["frac_skipped"] is None
      assert set(ref) >= {"vs_no_clipping", "outside_spread"}
    good = []
    for label, m in methods.items():
      assert m["sensitivity"] >= 0 and math.isfinite(m["sensitivity"]), label
      assert len(m["loss"]) == len(lrs)
      assert all(math.isfinite(x) and x <= t["initial_runs"][label][i][0]
                 + 1e-6 for i, x in enumerate(m["loss"])), label
      assert m["best_loss"] == pytest.approx(min(m["loss"]))
      assert m["best_loss"] >= t["best_loss"] - 1e-9
      assert m["best_lr"] in lrs
      assert m["largest_good_lr"] is None or m["largest_good_lr"] in lrs
      good.append(m["largest_good_lr"])
      assert len(m["final"]) == len(lrs) and len(m["final"][0]) == 1
      assert 0 <= m["num_diverged"] <= len(lrs)
      assert m["loss_spikes_per_run"] >= 0
      if label in ("no clipping", "skip_step(SpikeWindow())",
                   "QK-layernorm (model)"):
        assert m["frac_clipped"] is None
      else:
        assert 0 <= m["frac_clipped"] <= 1, label
      if label in SKIPPERS:
        assert 0 <= m["frac_skipped"] <= 1
      else:
        assert m["frac_skipped"] is None
      assert m["compile_s"] > 0 and m["run_s"] > 0
      if name == "transformer":
        assert m["attn_logit_max_at_best_lr"] > 0, label
    assert any(g is not None for g in good)  # The best method's own best.
  # A clipper bounds the step: a fixed threshold clips at the top learning
  # rate.
  assert data["tasks"]["regression"]["methods"][
      "clip_by_global_norm(tuned)"]["frac_clipped"] > 0.5


def summary(losses, lrs):
  """A task of the results file, one row per label: its mean losses."""
  methods = {label: {"loss": list(loss), "best_loss": min(loss),
                     "largest_good_lr": None}
             for label, loss in losses.items()}
  return {"lrs": lrs, "steps": 10, "seeds": 2, "margin": ["+", 0.05],
          "method_notes": ["old"], "settings": {"a": 1},
          "initial_runs": {k: [[3.0, 3.0]] * len(lrs) for k in losses},
          "best_loss": min(min(v) for v in losses.values()),
          "methods": methods}


def test_merge_adds_the_new_rows_and_keeps_the_old_as_measured(tmp_path):
  lrs = [0.1, 1.0]
  old = {"meta": {"command": "python -m benchmarks.stability",
                  "date_utc": "then", "wall_s": 100.0, "commit": "abc"},
         "tasks": {"t": summary({"no clipping": [1.0, 2.0],
                                 "zclip()": [0.9, 1.0]}, lrs)}}
  path = tmp_path / "r.json"
  path.write_text(json.dumps(old))
  new = {"meta": {"command": "python -m benchmarks.stability --only x",
                  "date_utc": "now", "wall_s": 10.0, "commit": "def"},
         "tasks": {"t": summary({"no clipping": [1.0, 2.5],
                                 "x": [0.5, 0.54]}, lrs)}}
  new["tasks"]["t"]["method_notes"] = ["old", "x's"]
  out = stability.merge(new, str(path))
  t = out["tasks"]["t"]
  assert list(t["methods"]) == ["no clipping", "zclip()", "x"]
  assert t["methods"]["no clipping"]["loss"] == [1.0, 2.0]  # Kept.
  assert [m["measured"] for m in t["methods"].values()] == [0, 0, 1]
  assert t["best_loss"] == 0.5 and t["method_notes"] == ["old", "x's"]
  # Taken again against the new best: within 0.05 of 0.5.
  assert t["methods"]["x"]["largest_good_lr"] == 1.0
  assert t["methods"]["zclip()"]["largest_good_lr"] is None
  runs = out["meta"]["runs"]
  assert [r["commit"] for r in runs] == ["abc", "def"]
  assert runs[0]["rows"] is None and runs[1]["rows"] == ["x"]
  assert runs[1]["no_clipping_change"] == {"t": pytest.approx(0.5)}
  assert out["meta"]["wall_s"] == 110.0
  new["tasks"]["t"]["lrs"] = [0.1, 10.0]
  with pytest.raises(SystemExit, match="lrs"):
    stability.merge(new, str(path))


def test_reference_comparison_pairs_seeds_and_reads_the_spread():
  rows = {"no clipping": {"sensitivity_per_seed": [0.6, 0.8]},
          "a": {"sensitivity_per_seed": [0.5, 0.7]},
          "b": {"sensitivity_per_seed": [0.3, 0.5]},
          "old": {}}  # A row measured before the comparison existed.
  stability.compare_to_reference(rows)
  assert rows["a"]["vs_no_clipping"] == pytest.approx(-0.1)
  assert rows["a"]["vs_no_clipping_per_seed"] == pytest.approx([-0.1, -0.1])
  assert rows["a"]["outside_spread"] is False  # 0.5-0.7 overlaps 0.6-0.8.
  assert rows["b"]["outside_spread"] is True
  assert "vs_no_clipping" not in rows["old"]


@pytest.mark.slow
def test_model_variants_add_qk_layernorm_and_the_z_loss():
  import jax
  import jax.numpy as jnp

  from benchmarks import _stability_tasks as tasks
  base = tasks.transformer(quick=True)
  norm = tasks.transformer(quick=True, qk_norm=True)
  z = tasks.transformer(quick=True, z_loss=1e-2)
  key = jax.random.key(0)
  p0, p1 = base.init(key), norm.init(key)
  assert "qnorm" in p1["blocks"][0] and "qnorm" not in p0["blocks"][0]
  # The shared parameters are drawn the same; the norms start as identity
  # maps, so only the per-head normalisation changes the loss.
  assert jnp.array_equal(p0["blocks"][0]["attn"]["q"],
                         p1["blocks"][0]["attn"]["q"])
  step = jnp.asarray(0)
  l0, _ = base.loss(p0, base.data, key, step)
  l1, _ = norm.loss(p1, norm.data, key, step)
  lz, _ = z.loss(p0, z.data, key, step)
  assert not jnp.allclose(l0, l1)
  assert lz > l0  # log(Z)^2 > 0 for a vocabulary of over one character.
  # The held-out loss stays the plain cross-entropy.
  assert jnp.array_equal(base.evaluate(p0, base.data)[0],
                         z.evaluate(p0, z.data)[0])
