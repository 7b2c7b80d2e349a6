"""Smoke test: examples/loss_spikes.py --small runs and makes its point."""

import os
import re
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
    if line.startswith("| ") and len(cells) == 6 and cells[0] != "run":
      rows[cells[0]] = cells[1:]
  return rows


def test_loss_spikes_small():
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(ROOT), os.environ.get("PYTHONPATH", "")]))
  start = time.time()
  proc = subprocess.run(
      [sys.executable, str(ROOT / "examples" / "loss_spikes.py"), "--small"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = proc.stdout
  scaled = re.search(r"scaled spikes at steps \[([\d, ]+)\]", out)
  assert scaled, out
  num_scaled = len(scaled.group(1).split(","))
  rows = _rows(out)
  names = list(rows)
  assert names[:7] == ["no clipping", "clip_by_global_norm(1.0)",
                       "AutoClip, paper", "AutoClip, package", "zclip()",
                       "adagc()", "spike_clipped(adamw)"], out
  guarded = names[7]
  assert len(names) == 8 and guarded.startswith("skip_step("), out
  assert guarded[len("skip_step("):-1] in names[1:7], out
  val = {run: float(cells[0].split()[0]) for run, cells in rows.items()}
  clipped = {run: float(cells[2]) for run, cells in rows.items()}
  skipped = {run: float(cells[3]) for run, cells in rows.items()}

  # Unclipped, the spikes wreck the run; the norm clippers end far lower.
  for run in ("clip_by_global_norm(1.0)", "AutoClip, paper",
              "AutoClip, package", "adagc()", guarded):
    assert val[run] < 0.8 * val["no clipping"], out
  # The guard skips at least the scaled spikes; nothing else skips.
  assert skipped[guarded] >= num_scaled, out
  assert all(skipped[run] == 0 for run in names[:7]), out
  assert clipped["no clipping"] == 0, out
  assert all(clipped[run] >= 1 for run in names[1:7]), out
  png = (ROOT / "examples" / "output" / "loss_spikes.png").stat()
  assert png.st_size > 10_000 and png.st_mtime >= start - 1
