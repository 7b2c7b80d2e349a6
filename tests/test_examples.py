"""Smoke tests: each example runs at a small size and its numbers make its point."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def run_example(name: str, *args: str, out: Path) -> list[dict[str, dict]]:
  """Runs ``examples/<name>.py``; returns its printed tables and checks its PNG."""
  env = dict(os.environ, OPTAXCLIP_EXAMPLES_OUTPUT=str(out), MPLBACKEND="Agg")
  env.pop("XLA_FLAGS", None)  # One CPU device, as when run by hand.
  proc = subprocess.run(
      [sys.executable, f"examples/{name}.py", *args], cwd=ROOT, env=env,
      capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (out / f"{name}.png").stat().st_size > 10_000
  return parse_tables(proc.stdout)


def parse_tables(text: str) -> list[dict[str, dict]]:
  """Markdown tables -> ``[{row label: {column: value}}]``, numbers as floats."""
  tables, header, rows = [], None, {}
  for line in text.splitlines() + [""]:
    if not line.startswith("|"):
      if header:
        tables.append(rows)
      header, rows = None, {}
      continue
    cells = [c.strip() for c in line.strip("|").split("|")]
    if header is None:
      header = cells
    elif not set(line) <= set("|-"):
      rows[cells[0]] = dict(zip(header[1:], map(number, cells[1:])))
  return tables


def number(cell: str) -> float | str:
  try:
    return float(cell)
  except ValueError:
    return cell


def diverged(mse: float) -> bool:
  return math.isnan(mse) or mse > 1e6


def test_parse_tables():
  text = "title\n| run | a | b |\n|---|---|---|\n| x | nan | - |\n| y | 1.5 | z |\n"
  [table] = parse_tables(text)
  assert math.isnan(table["x"]["a"]) and table["x"]["b"] == "-"
  assert table["y"] == {"a": 1.5, "b": "z"}


def test_exploding_gradients(tmp_path):
  [table] = run_example("exploding_gradients", "--epochs", "20", out=tmp_path)
  assert set(table) == {"none", "clip_by_norm(1.0)", "clip_by_global_norm(1.0)",
                        "clip_by_value(5.0)"}
  assert diverged(table["none"]["train MSE"])
  assert table["none"]["max grad norm"] > 1e10
  for label in ["clip_by_norm(1.0)", "clip_by_global_norm(1.0)",
                "clip_by_value(5.0)"]:
    row = table[label]
    # The initial train MSE is about 2e4; every clipper brings it far down.
    assert row["train MSE"] < 1e3 and row["test MSE"] < 1e3, (label, row)
    assert 0 < row["share clipped"] <= 1
    assert row["max grad norm"] < 1e5


def test_rnn_through_time(tmp_path):
  rnn, lstm = run_example("rnn_through_time", "--small", out=tmp_path)
  clip = "clip_by_global_norm(1.0)"
  # Unclipped: about the spectral radius (1.2) per step back; clipped: bounded.
  assert 1.1 < rnn["none"]["growth per step"] < 1.3
  assert rnn["none"]["at first step"] > 1e5 * rnn["none"]["at last step"]
  assert rnn[clip]["max"] < 10 * rnn[clip]["at last step"]
  assert diverged(lstm["none"]["final MSE"])
  assert lstm[clip]["final MSE"] < 0.05  # Predicting the mean gives 0.167.
  assert lstm[clip]["max grad norm"] < 100


def test_flax_linen(tmp_path):
  [table] = run_example("flax_linen", "--epochs", "20", out=tmp_path)
  unclipped, clipped = table["clip_by_global_norm(inf)"], table[
      "clip_by_global_norm(1.0)"]
  assert diverged(unclipped["train MSE"]) and unclipped["steps clipped"] == 0
  assert unclipped["max grad norm"] > 1e10  # Logged from clip_stats.
  assert clipped["train MSE"] < 1e3 and clipped["steps clipped"] > 0.9


def test_per_group(tmp_path):
  runs, groups = run_example("per_group", "--small", out=tmp_path)
  assert diverged(runs["none"]["final train MSE"])
  best = min(runs[label]["test MSE"] for label in
             ["per_group(constant)", "per_group(schedule)", "per_group(agc)"])
  # Targets have variance ~113; clipped runs learn, per-group ones best here.
  assert runs["clip_by_global_norm(1.0)"]["test MSE"] < 30
  assert best < runs["clip_by_global_norm(1.0)"]["test MSE"]
  assert groups["embed"]["clipper"] == "clip_by_value"
  assert groups["dense"]["clipper"] == "clip_by_global_norm"
  # The dense threshold follows linear_schedule(2.0, 0.3) over the 400 steps.
  assert groups["dense"]["first threshold"] == pytest.approx(2.0)
  assert groups["dense"]["last threshold"] == pytest.approx(0.3, abs=0.01)


def test_layer_norms(tmp_path):
  [table] = run_example("layer_norms", "--steps", "35", out=tmp_path)
  unclipped, clipped = table["unclipped"], table["clip_by_global_norm(1.0)"]
  # Unclipped, the per-layer norms blow up and turn non-finite mid-run;
  # clipped, they stay within a few orders of the start.
  assert 5 < unclipped["first non-finite step"] <= 35
  assert unclipped["its largest finite norm"] > 1e8
  assert clipped["first non-finite step"] == "-"
  assert clipped["its largest finite norm"] < 1e4
  assert clipped["final loss"] < 1e3


def test_fp16_loss_scaling(tmp_path):
  [table] = run_example("fp16_loss_scaling", "--steps", "100",
                        "--growth-interval", "4", out=tmp_path)
  f32, f16 = table["float32"], table["float16"]
  scaled = table["float16 + dynamic_loss_scale"]
  # Unscaled, float16 loses a share of the gradient entries to underflow;
  # the loss scale keeps nearly all, climbs to overflow and skips those steps.
  assert f16["mean lost share"] > 0.02
  assert scaled["mean lost share"] < 1e-3 < f16["mean lost share"] / 20
  assert scaled["steps skipped"] >= 1
  assert scaled["largest scale"] >= 2.0**25
  assert scaled["final loss"] < 2 * f32["final loss"]


def test_muon_stability(tmp_path):
  [table] = run_example("muon_stability", "--steps", "30", "--max-logit",
                        "3", "--plant-from", "20", out=tmp_path)
  none, qk = table["none"], table["qk_clip"]
  bad, guarded = table["bad batches"], table["bad batches + skip_step"]
  # The logits start above max_logit = 3; QK-Clip acts and holds them lower.
  assert none["max logit, step 1"] > 3
  assert none["steps QK-clipped"] == 0 and qk["steps QK-clipped"] > 0
  assert qk["last step"] < none["last step"]
  # Step 20 (0-based) is planted (wrong labels, loss x 100): skipped, alone.
  assert none["skipped (planted)"] == "0 (0)"
  assert bad["skipped (planted)"] == "0 (0)"
  assert guarded["skipped (planted)"] == "1 (1)"
  assert guarded["val loss"] < bad["val loss"]


def test_vit_linen(tmp_path):
  runs, layers = run_example("vit_linen", "--steps", "30", out=tmp_path)
  clean, planted = runs["adamw"], runs["adamw, bad batch"]
  # The planted batch (step 18 of 30) is skipped, alone, by the loss rule.
  assert clean["steps skipped"] == 0 and planted["steps skipped"] == 1
  assert planted["which"] == "[18]"
  # Every run learns something (chance is 0.1) in 30 steps.
  assert clean["test accuracy"] > 0.3 and planted["test accuracy"] > 0.3
  assert runs["DP-SGD (ghost)"]["test accuracy"] > 0.1
  # One finite per-layer norm per scanned block, read via oc.layer_axes.
  assert len(layers["0"]) == 4
  assert all(0 < v < 1e3 for v in layers["0"].values())


def test_lm_multisteps(tmp_path):
  [table] = run_example("lm_multisteps", "--micro", "40", out=tmp_path)
  clean, bad = table["clean stream"], table["with a NaN micro-batch"]
  # MultiSteps' counters, read through skip_step's state: 40 good
  # micro-batches of 4 make 10 steps in both runs; the NaN one is skipped.
  assert clean["gradient_step"] == bad["gradient_step"] == 10
  assert clean["mini_step"] == bad["mini_step"] == 0
  assert clean["skipped"] == 0 and bad["skipped"] == 1
  # Dropped alone: the run ends bit for bit as the one without it.
  assert bad["same parameters"] == "True"


def test_equinox_mlp(tmp_path):
  pytest.importorskip("equinox")
  [table] = run_example("equinox_mlp", "--steps", "40", out=tmp_path)
  free, clipped = table["clip_by_global_norm(inf)"], table[
      "clip_by_global_norm(1.0)"]
  assert free["steps clipped"] == 0 and clipped["steps clipped"] > 0
  assert free["test accuracy"] > 0.5 and clipped["test accuracy"] > 0.5
