"""Smoke tests: examples/dp_sgd.py and dp_transformer.py --small run and make
their point."""

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def _rows(output: str) -> dict[str, list[str]]:
  """The printed Markdown table, as ``{run: [cells...]}``."""
  rows = {}
  for line in output.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if line.startswith("| ") and len(cells) == 7 and cells[0] != "run":
      rows[cells[0]] = cells[1:]
  return rows


def test_dp_sgd_small(tmp_path):
  env = dict(os.environ, OPTAXCLIP_EXAMPLES_OUTPUT=str(tmp_path),
             MPLBACKEND="Agg", PYTHONPATH=os.pathsep.join(
                 [str(ROOT), os.environ.get("PYTHONPATH", "")]))
  env.pop("XLA_FLAGS", None)  # One CPU device, as when run by hand.
  start = time.time()
  proc = subprocess.run(
      [sys.executable, str(ROOT / "examples" / "dp_sgd.py"), "--small"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = proc.stdout
  rows = _rows(out)
  assert list(rows) == ["non-private", "sigma=1", "sigma=1 adaptive"], out
  acc = {run: float(cells[2]) for run, cells in rows.items()}
  eps = {run: cells[1] for run, cells in rows.items()}
  frac = {run: float(cells[3]) for run, cells in rows.items()}
  threshold = {run: float(cells[4]) for run, cells in rows.items()}
  # Learning happens (10 classes: chance is 0.1), privately too, and privacy
  # costs accuracy.
  assert acc["non-private"] > 0.85, out
  assert 0.5 < acc["sigma=1"] <= acc["non-private"] + 0.02, out
  assert acc["sigma=1 adaptive"] > 0.5, out
  # No clipping without privacy; the adaptive norm clips about half (its
  # target quantile is 0.5) where the fixed norm of 1 clips most examples.
  assert frac["non-private"] == 0 and math.isinf(threshold["non-private"]), out
  assert 0.2 < frac["sigma=1 adaptive"] < 0.8 < frac["sigma=1"], out
  assert threshold["sigma=1 adaptive"] > 1.0, out
  # Epsilon: computed when dp-accounting is installed, else said so.
  assert eps["non-private"] == "inf", out
  try:
    import dp_accounting  # noqa: F401
  except ImportError:
    assert eps["sigma=1"] == "n/a" and "not installed" in out, out
  else:
    assert 1.0 < float(eps["sigma=1"]) < 20.0, out
    assert eps["sigma=1"] == eps["sigma=1 adaptive"], out
  png = (tmp_path / "dp_sgd.png").stat()
  assert png.st_size > 10_000 and png.st_mtime >= start - 1


def test_dp_transformer_small(tmp_path):
  """The stacked nnx.MultiHeadAttention model: both runs learn, and ghost's
  compiled memory stays near the non-private step's, far below vmap's."""
  env = dict(os.environ, OPTAXCLIP_EXAMPLES_OUTPUT=str(tmp_path),
             MPLBACKEND="Agg", PYTHONPATH=os.pathsep.join(
                 [str(ROOT), os.environ.get("PYTHONPATH", "")]))
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, str(ROOT / "examples" / "dp_transformer.py"),
       "--small"], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = proc.stdout
  lines = [[c.strip() for c in line.strip().strip("|").split("|")]
           for line in out.splitlines() if line.startswith("| ")]
  runs = {c[0]: c[1:] for c in lines if len(c) == 4 and c[0] != "run"}
  for run in ("non-private", "DP-SGD, ghost"):
    assert float(runs[run][1]) < float(runs[run][0]), out
  memory = [c for c in lines if len(c) == 6 and c[0].startswith("batch")]
  assert len(memory) == 2, out
  for _, _, ghost, vmap, ratio, _ in memory:
    assert float(ratio) < 1.6 and float(vmap) > 2 * float(ghost), out
